"""pwf as a user installs it: a wheel built from the checkout, installed into a fresh virtual
environment, runs ``pwf run`` from a folder outside any checkout (its embedded default config
is package data) and reports the one version pwf has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import pwf_core
from tests.conftest import ROOT


def _run(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_wheel_in_a_fresh_venv_runs_the_default_experiment(prefect_server, tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    tracked = _run(["git", "ls-files"], cwd=ROOT).split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run([*build, "-w", str(wheels), str(source)], cwd=tmp_path)
    (wheel,) = wheels.glob("pwf-*.whl")
    assert wheel.name.startswith(f"pwf-{pwf_core.__version__}-")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies (torch, Prefect, MLflow: gigabytes) come from the test's own
    # environment through a path entry; pwf itself only from the wheel.
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere / 'mlruns.db'}",
    }
    where = _run([str(python), "-c", "import pwf_core; print(pwf_core.__file__)"], elsewhere, env)
    assert str(site) in where and str(ROOT) not in where  # the wheel's copy, not the checkout
    # Every module of the checkout is in the wheel (a package left out of pyproject's list
    # would break the commands that import it, e.g. pwf report).
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in ("pwf_core", "pwf_flows")
        for path in (ROOT / package).rglob("*.py")
    )
    script = f"import importlib; [importlib.import_module(m) for m in {modules!r}]"
    _run([str(python), "-c", script], elsewhere, env)
    version = _run([str(venv / "bin" / "pwf"), "--version"], elsewhere, env)
    assert version.strip() == f"pwf {pwf_core.__version__}"
    tiny = ["pretrain.epochs=2", "train.epochs=0.1", "compression.schedule=[0.5, 1.0]"]
    sets = [arg for item in tiny for arg in ("--set", item)]
    output = _run([str(venv / "bin" / "pwf"), "run", "--no-progress", *sets], elsewhere, env)
    assert "pwf run finished" in output and "unique values" in output
    assert (elsewhere / "artifacts" / "experiments" / "pwf-default").is_dir()
