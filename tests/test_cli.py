"""The ``pwf`` command: bad input stops early in one line, Ctrl-C and SIGKILL end cleanly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pwf_core._files import save_tensors, write_text_atomic
from pwf_core.models import build_model
from pwf_flows.cli import main as pwf_main
from tests._dummies.files import (
    write_cifar10,
    write_crafted_cifar10,
    write_crafted_pt,
    write_image_folder,
)
from tests._dummies.services import exited, temporary_server, wait_until, with_default_signals
from tests.conftest import DEFAULT_CONFIG, ROOT


def _config(tmp: Path, **fields) -> str:
    path = tmp / "config.yaml"
    values = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for key, value in fields.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _raw(tmp: Path, content: bytes) -> str:
    path = tmp / "raw.yaml"
    path.write_bytes(content)
    return str(path)


def _sweep(tmp: Path, **fields) -> str:
    values = {
        "name": "s",
        "base": str(DEFAULT_CONFIG),
        "space": {"compression.reg": {"float": [1e-5, 1e-2], "log": True}},
        "study": {"n_trials": 2, "storage": f"sqlite:///{tmp / 'optuna.db'}"},
        **fields,
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _weights(tmp: Path, classes: int) -> str:
    path = tmp / "weights.safetensors"
    save_tensors(path, build_model("small_cnn", classes, 1).state_dict())
    return str(path)


def _garbage(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(b"\x00garbage" * 20)
    return str(path)


def _text(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_text("these are my notes, not weights\n" * 20)
    return str(path)


def _random(tmp: Path, name: str, size: int = 4096) -> str:
    path = tmp / name
    path.write_bytes(random.Random(0).randbytes(size))
    return str(path)


def _broken_images(tmp: Path) -> str:
    root = write_image_folder(tmp / "imgs")
    for image in (root / "train").rglob("*.png"):
        image.write_bytes(b"not a png")
    return str(root)


RUN = ["run"]
# (id, argv builder, expected words in the one line). Every case must exit 2 before anything
# is written or tracked.
BAD_INPUTS = [
    ("unknown-model", lambda t: [*RUN, "--set", "model.name=resnet_nope"], "model.name"),
    (
        "schedule-not-increasing",
        lambda t: [*RUN, "--set", "compression.schedule=[0.5, 0.3, 1.0]"],
        "compression.schedule",
    ),
    ("schedule-not-ending-at-1", lambda t: [*RUN, "--set", "compression.schedule=[0.5]"], "1.0"),
    ("missing-config", lambda t: ["run", str(t / "nope.yaml")], "nope.yaml"),
    ("config-not-yaml", lambda t: ["run", _raw(t, b"model: [unclosed")], "not valid YAML"),
    ("config-empty", lambda t: ["run", _raw(t, b"")], "is empty"),
    ("config-not-utf8", lambda t: ["run", _raw(t, b"name: caf\xe9\n")], "not UTF-8"),
    ("config-a-list", lambda t: ["run", _raw(t, b"- 1\n- 2\n")], "mapping"),
    ("set-without-equals", lambda t: [*RUN, "--set", "compression.b"], "section.field=value"),
    ("set-not-yaml", lambda t: [*RUN, "--set", "model.name=[unclosed"], "not valid YAML"),
    ("set-infinity", lambda t: [*RUN, "--set", "train.lr=.inf"], "not a finite number"),
    ("set-nan", lambda t: [*RUN, "--set", "train.lr=.nan"], "not a finite number"),
    ("unknown-section", lambda t: [*RUN, "--set", "trian.epochs=1"], "trian"),
    ("unknown-method", lambda t: [*RUN, "--set", "compression.method=magic"], "unknown method"),
    ("other-methods-knob", lambda t: [*RUN, "--set", "compression.clusters=4"], "clusters"),
    ("name-empty", lambda t: [*RUN, "--set", "name=''"], "name is empty"),
    ("name-parent-dirs", lambda t: [*RUN, "--set", "name=../../x"], "name '../../x'"),
    ("name-absolute", lambda t: [*RUN, "--set", "name=/tmp/x"], "name '/tmp/x'"),
    ("name-too-long", lambda t: [*RUN, "--set", f"name={'x' * 300}"], "300 characters"),
    ("batch-size-zero", lambda t: [*RUN, "--set", "train.batch_size=0"], "train.batch_size"),
    ("negative-reg", lambda t: [*RUN, "--set", "compression.reg=-1"], "compression.reg"),
    (
        "data-path-missing",
        lambda t: [*RUN, "--set", "data={name: mnist, path: /no/mnist}"],
        "/no/mnist",
    ),
    (
        "mnist-folder-empty",
        lambda t: ["run", _config(t, **{"data.name": "mnist", "data.path": str(t)})],
        "train-images",
    ),
    (
        "cifar-garbage-batch",
        lambda t: [
            "run",
            _config(t, **{"data.name": "cifar10", "data.path": str(_garbled_cifar(t))}),
        ],
        "data_batch_2",
    ),
    (
        "cifar-crafted-pickle",
        lambda t: [
            "run",
            _config(
                t,
                **{
                    "data.name": "cifar10",
                    "data.path": str(write_crafted_cifar10(t / "c", t / "pwned")),
                },
            ),
        ],
        "refused to load posix.system",
    ),
    (
        "imagefolder-broken-images",
        lambda t: [
            "run",
            _config(t, **{"data.name": "imagefolder", "data.path": _broken_images(t)}),
        ],
        "cannot be read",
    ),
    (
        "imagefolder-without-val",
        lambda t: ["run", _config(t, **{"data.name": "imagefolder", "data.path": str(t)})],
        "no 'train/' subfolder",
    ),
    ("weights-missing", lambda t: [*RUN, "--set", f"model.weights={t}/no.pt"], "model.weights"),
    (
        "weights-garbage",
        lambda t: [*RUN, "--set", f"model.weights={_garbage(t, 'w.safetensors')}"],
        "w.safetensors",
    ),
    (
        "weights-other-architecture",
        lambda t: [*RUN, "--set", f"model.weights={_weights(t, 5)}"],
        "head.weight: file (5, 64) vs model (10, 64)",
    ),
    (
        "weights-crafted-pickle",
        lambda t: [*RUN, "--set", f"model.weights={write_crafted_pt(t / 'evil.pt', t / 'pwned')}"],
        "refused",
    ),
    (
        "exclude-names-no-layer",
        lambda t: [*RUN, "--set", "compression.exclude=[fcc]"],
        "compression.exclude: 'fcc' matches no conv/linear layer",
    ),
    ("model-kwargs-refused", lambda t: [*RUN, "--set", "model.kwargs={nope: 1}"], "model.kwargs"),
    ("device-cuda-absent", lambda t: [*RUN, "--set", "device=cuda"], "no CUDA device"),
    ("device-nonsense", lambda t: [*RUN, "--set", "device=gpu7"], "not a torch device"),
    ("vit-on-8x8", lambda t: [*RUN, "--set", "model.name=test_vit"], "does not run on digits"),
    ("artifacts-is-a-file", lambda t: [*RUN, "--artifacts", _garbage(t, "afile")], "is a file"),
    ("sweep-missing", lambda t: ["sweep", str(t / "none.yaml")], "none.yaml"),
    ("sweep-not-utf8", lambda t: ["sweep", _raw(t, b"name: caf\xe9\n")], "not UTF-8"),
    ("sweep-bad-name", lambda t: ["sweep", _sweep(t, name="../x")], "name '../x'"),
    (
        "sweep-unknown-space-key",
        lambda t: ["sweep", _sweep(t, space={"compression.nope": {"choices": [1, 2]}})],
        "space.compression.nope",
    ),
    (
        "sweep-bad-storage",
        lambda t: ["sweep", _sweep(t, study={"n_trials": 2, "storage": "redis://x/0"})],
        "study.storage",
    ),
    ("weights-text-as-pt", lambda t: [*RUN, "--set", f"model.weights={_text(t, 'w.pt')}"], "w.pt"),
    ("weights-a-folder", lambda t: [*RUN, "--set", f"model.weights={t}"], "is a folder"),
    ("config-a-folder", lambda t: ["run", str(t)], "is a folder"),
    (
        "config-repeated-key",
        lambda t: ["run", _raw(t, b"name: a\ntrain:\n  lr: 0.1\n  lr: 0.2\n")],
        "'lr' on line 4 repeats the one on line 3",
    ),
    (
        "sweep-repeated-key",
        lambda t: ["sweep", _raw(t, b"name: a\nname: b\n")],
        "'name' on line 2 repeats",
    ),
    (
        "sweep-storage-not-sqlite",
        lambda t: [
            "sweep",
            _sweep(t, study={"n_trials": 2, "storage": f"sqlite:///{_text(t, 'notes.db')}"}),
        ],
        "is not a SQLite database",
    ),
    (
        "tracking-uri-malformed",
        lambda t: ([*RUN], {"MLFLOW_TRACKING_URI": "htp:/127.0.0.1:5000"}),
        "MLflow tracking URI 'htp:/127.0.0.1:5000' is not a server",
    ),
    (
        "tracking-uri-not-sqlite",
        lambda t: ([*RUN], {"MLFLOW_TRACKING_URI": f"sqlite:///{_text(t, 'n.db')}"}),
        "is not a SQLite database",
    ),
    (
        "sweep-tracking-uri-bad-port",
        lambda t: (["sweep", _sweep(t)], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:x/"}),
        "is not a valid URL",
    ),
    (
        "report-tracking-uri-malformed",
        lambda t: ["report", "--experiment", "e", "--tracking-uri", "http//127.0.0.1:5000"],
        "--tracking-uri 'http//127.0.0.1:5000' is not a server",
    ),
    (
        "export-random-bytes",
        lambda t: ["export", _random(t, "model.pwf.safetensors")],
        "is damaged or not a safetensors file",
    ),
    ("export-a-folder", lambda t: ["export", str(t)], "is a folder"),
]


def _garbled_cifar(tmp: Path) -> Path:
    folder = write_cifar10(tmp / "cifar-10-batches-py")
    (folder / "data_batch_2").write_bytes(b"garbage")
    return folder


@pytest.mark.parametrize(
    ("builder", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_ends_in_one_line_before_anything_starts(
    builder, expected, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    artifacts = tmp_path / "artifacts"
    argv = builder(tmp_path)
    if isinstance(argv, tuple):  # the case sets the environment too
        argv, env = argv
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    if argv[0] in ("run", "sweep") and "--artifacts" not in argv:
        argv += ["--artifacts", str(artifacts)]
    code = pwf_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("pwf: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not artifacts.exists()
    assert not (tmp_path / "mlruns.db").exists()  # no MLflow store, let alone a run
    assert not (tmp_path / "pwned").exists()  # no crafted file ran its command


def test_there_are_at_least_thirty_bad_input_cases():
    assert len(BAD_INPUTS) >= 30


def test_deleted_mlflow_experiment_is_named(mlflow_store, tmp_path, capsys):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("pwf-default"))
    code = pwf_main(["run", "--artifacts", str(tmp_path / "a")])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("pwf:")]
    assert code == 2 and "Traceback" not in err
    assert "MLflow experiment 'pwf-default' was deleted" in line and "restore" in line
    assert not (tmp_path / "a").exists()


def test_version():
    done = subprocess.run(
        [sys.executable, "-m", "pwf_flows.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.startswith("pwf 0.")


def test_help_names_the_default_config_and_common_options():
    for command in ("run", "sweep"):
        out = subprocess.run(
            [sys.executable, "-m", "pwf_flows.cli", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert "--artifacts" in out and "--no-progress" in out and "--set" in out
    assert "configs/default.yaml" in out or command == "sweep"


def test_artifact_files_are_created_with_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "x" / "summary.json", "{}")
        save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644


def _start_pwf(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    command = [sys.executable, "-m", "pwf_flows.cli", "run", "--no-progress", *extra]
    return subprocess.Popen(
        with_default_signals(command),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_leaves_no_temporary_server_behind(tmp_path):
    process = _start_pwf(tmp_path, "--set", "pretrain.epochs=200")
    servers = []

    def server_up() -> bool:
        servers[:] = [temporary_server(process.pid)]
        return servers[0] is not None and (tmp_path / "artifacts").exists()

    wait_until(server_up, "the temporary server to start", processes=[process])
    process.send_signal(signal.SIGKILL)
    process.wait()
    wait_until(lambda: exited(servers[0]), "the temporary Prefect server to die", timeout=20)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_ends_in_one_line_and_a_killed_run(tmp_path):
    process = _start_pwf(tmp_path, "--set", "pretrain.epochs=200")
    wait_until(lambda: (tmp_path / "artifacts").exists(), "the run to start", processes=[process])
    time.sleep(3)  # well inside pretraining
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1] == "pwf: interrupted; rerun the same command to continue"
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pwf-default").experiment_id])
    assert run.info.status == "KILLED"
