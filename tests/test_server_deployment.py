"""The README's "On a server" commands, run for real: a Prefect server, an MLflow server, process
work pools and workers from the project venv, ``prefect deploy --all`` and
``prefect deployment run pwf/full-sweep``; the runs are read back through MLflow's REST API and
the study from its Optuna storage. Ports are free ones instead of 4200/5000/5001."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pwf_core.config import config_to_dict, load_config
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """Background services started from README commands, stopped the documented way."""

    def __init__(self, workdir: Path, ports: dict[str, int]) -> None:
        self.workdir, self.ports = workdir, ports
        self.processes: list[tuple[str, subprocess.Popen, int]] = []
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "PREFECT_HOME": str(workdir / ".prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['4200']}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['5000']}",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers poll faster than the default 10 s
        }
        for line in README.splitlines():
            if line.startswith("export PREFECT_SERVER_ANALYTICS_ENABLED"):
                for assignment in shlex.split(line)[1:]:
                    key, value = assignment.split("=", 1)
                    self.env[key] = value

    def command(self, readme_line: str) -> tuple[list[str], dict[str, str]]:
        """A README command with the test's ports, split into argv and leading VAR=value."""
        assert readme_line in README, f"README no longer shows: {readme_line}"
        for default, port in self.ports.items():
            readme_line = readme_line.replace(default, str(port))
        words = shlex.split(readme_line)
        extra = {}
        while "=" in words[0] and not words[0].startswith("-"):
            key, value = words.pop(0).split("=", 1)
            extra[key] = value.replace("$PWD", str(ROOT))
        return words, extra

    def run(self, readme_line: str, cwd: Path | None = None, timeout: float = 120, **kw) -> str:
        argv, extra = self.command(readme_line)
        done = subprocess.run(
            argv,
            cwd=cwd or self.workdir,
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        assert done.returncode == 0, f"{readme_line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def start(self, name: str, readme_line: str, stop_signals: int = 1) -> None:
        argv, extra = self.command(readme_line)
        log = (self.workdir / f"{name}.log").open("w")
        process = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env={**self.env, **extra},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process, stop_signals))

    def stop(self) -> None:
        # Workers ignore one SIGTERM; two SIGINTs stop them. The servers exit on SIGTERM.
        for _, process, signals in reversed(self.processes):
            for _ in range(signals):
                if process.poll() is None:
                    process.send_signal(signal.SIGINT if signals > 1 else signal.SIGTERM)
                    time.sleep(1)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for(url: str, stack: Stack, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        for name, process, _ in stack.processes:
            log = stack.workdir / f"{name}.log"
            assert process.poll() is None, f"{name} exited:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{url} did not come up"
        time.sleep(0.5)


def mlflow_rest(port: int, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory):
    """The README's servers, pools, workers and ``prefect deploy --all``, once for the module."""
    workdir = tmp_path_factory.mktemp("stack")
    ports = {"4200": free_port(), "5000": free_port(), "5001": free_port()}
    stack = Stack(workdir, ports)
    try:
        stack.start("prefect-server", "prefect server start --host 127.0.0.1 --port 4200")
        stack.start(
            "mlflow-server",
            "mlflow server --host 127.0.0.1 --port 5000 --workers 1 "
            "--backend-store-uri sqlite:///mlruns.db",
        )
        wait_for(f"http://127.0.0.1:{ports['4200']}/api/health", stack)
        wait_for(f"http://127.0.0.1:{ports['5000']}/health", stack)
        stack.run("prefect work-pool create gpu --type process")
        stack.run("prefect work-pool create cpu --type process")
        stack.start(
            "worker-gpu",
            "CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1",
            stop_signals=2,
        )
        stack.start("worker-cpu", "prefect worker start --pool cpu", stop_signals=2)
        deployed = stack.run("PWF_PROJECT_DIR=$PWD prefect --no-prompt deploy --all", cwd=ROOT)
        assert "pwf/full-sweep" in deployed and "pwf-experiment/gpu" in deployed
        yield stack
    finally:
        stack.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_readme_server_commands_run_a_sweep_on_workers(readme_stack):
    stack = readme_stack
    tmp_path, ports = stack.workdir / "readme-sweep", stack.ports
    tmp_path.mkdir()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = {
        "study.n_trials": 2,
        "study.storage": storage,
        "execution.artifacts_dir": str(tmp_path / "artifacts"),
        "execution.max_parallel": 2,  # both submitted at once; the worker queues one
        "overrides": {"pretrain.epochs": 3, "train.epochs": 0.25, "eval.mc_samples": 0},
        "space": {
            "compression.b": {"int": [4, 6]},
            "compression.schedule": {"choices": {"two": [0.5, 1.0], "three": [0.4, 0.8, 1.0]}},
        },
    }
    readme_run = (
        "prefect deployment run pwf/full-sweep "
        """--param overrides='{"study.n_trials": 24}' --watch"""
    )
    argv, _ = stack.command(readme_run)
    argv[argv.index("--param") + 1] = f"overrides={json.dumps(overrides)}"
    argv += ["--watch-timeout", "600"]
    done = subprocess.run(
        argv, cwd=tmp_path, env=stack.env, capture_output=True, text=True, timeout=660
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Completed" in output, output[-4000:]

    study = optuna.load_study(study_name="full-sweep", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2

    experiments = mlflow_rest(ports["5000"], "experiments/search", {"max_results": 50})
    (experiment,) = [e for e in experiments["experiments"] if e["name"] == "full-sweep"]
    runs = mlflow_rest(
        ports["5000"], "runs/search", {"experiment_ids": [experiment["experiment_id"]]}
    )
    runs = runs["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    (parent,) = [r for r, t in zip(runs, tags, strict=True) if t.get("kind") == "sweep"]
    children = [t for t in tags if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert len(runs) == 3 and len(children) == 2
    assert all(run["info"]["status"] == "FINISHED" for run in runs)
    assert {t["sweep.trial"] for t in children} == {"0", "1"}

    stack.run(
        'prefect deployment schedule create pwf/ablation-regulariser --cron "0 2 * * 6" '
        "--timezone UTC"
    )
    schedules = stack.run("prefect deployment schedule ls pwf/ablation-regulariser")
    assert "0 2 * * 6" in schedules
    stack.start(
        "mlflow-ui",
        "mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5001",
    )
    wait_for(f"http://127.0.0.1:{ports['5001']}/", stack)


def prefect_rest(stack: Stack, endpoint: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{stack.env['PREFECT_API_URL']}/{endpoint}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def flow_run_id(output: str) -> str:
    return next(line.split()[-1] for line in output.splitlines() if "UUID" in line)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_shipped_deployment_runs_to_completion(readme_stack):
    """Each deployment of prefect.yaml as ``prefect deployment run`` starts it, submitted at
    once: the sweeps' drivers on the cpu pool, their trials on the gpu pool, one trial each on
    a tiny base; and a single experiment on ``pwf-experiment/gpu``."""
    from tests.test_shipped_sweeps import tiny_overrides

    stack = readme_stack
    workdir = stack.workdir / "deployments"
    workdir.mkdir()
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    submitted: dict[str, tuple[str, str | None]] = {}
    for deployment in deployments:
        if deployment["name"] == "gpu":
            config = load_config(
                ROOT / "configs" / "default.yaml",
                {
                    "name": "deploy-gpu",
                    "pretrain.epochs": 2,
                    "train.epochs": 0.1,
                    "compression.schedule": [0.5, 1.0],
                },
            )
            params = [
                f"config={json.dumps(config_to_dict(config))}",
                f"artifacts_dir={workdir / 'artifacts'}",
            ]
            target, study = "pwf-experiment/gpu", None
        else:
            sweep = ROOT / deployment["parameters"]["sweep"]
            study = f"deploy-{deployment['name']}"
            storage = f"sqlite:///{workdir / (study + '.db')}"
            fields = tiny_overrides(sweep, storage, workdir / "artifacts", n_trials=1)
            params = [f"overrides={json.dumps(fields | {'name': study})}"]
            target = f"pwf/{deployment['name']}"
        argv = ["prefect", "deployment", "run", target]
        for param in params:
            argv += ["--param", param]
        done = subprocess.run(
            argv, cwd=workdir, env=stack.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        submitted[target] = (flow_run_id(done.stdout + done.stderr), study)
    assert len(submitted) == len(deployments) == 9

    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    deadline = time.time() + 780
    states: dict[str, str] = {}
    while len(states) < len(submitted):
        assert time.time() < deadline, f"still running: {set(submitted) - set(states)}"
        for target, (run_id, _) in submitted.items():
            state = prefect_rest(stack, f"flow_runs/{run_id}")["state"]["type"]
            if state in final:
                states[target] = state
        time.sleep(2)
    assert states == dict.fromkeys(submitted, "COMPLETED"), states
    for target, (_, study) in submitted.items():
        if study is None:
            continue
        storage = f"sqlite:///{workdir / (study + '.db')}"
        trials = optuna.load_study(study_name=study, storage=storage).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE], target
    experiments = mlflow_rest(stack.ports["5000"], "experiments/search", {"max_results": 100})
    names = {e["name"]: e["experiment_id"] for e in experiments["experiments"]}
    for target, (_, study) in submitted.items():
        runs = mlflow_rest(
            stack.ports["5000"], "runs/search", {"experiment_ids": [names[study or "deploy-gpu"]]}
        )["runs"]
        assert len(runs) == (2 if study else 1), target  # the sweep's parent and its trial
        assert all(run["info"]["status"] == "FINISHED" for run in runs), target
