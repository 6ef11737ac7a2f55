"""The README's "On a server" commands, run for real: a Prefect server, an MLflow server, process
work pools and workers from the project venv, ``prefect deploy --all`` and
``prefect deployment run pwf/full-sweep``; the runs are read back through MLflow's REST API and
the study from its Optuna storage. Ports are free ones instead of 4200/5000 (local runs are
browsed with ``pwf ui``: tests/test_ui.py)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pwf_core.config import config_to_dict, load_config
from tests._dummies.services import (
    WORKER_INTERRUPTS,
    Service,
    Services,
    flow_run_id,
    free_port,
)
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


@dataclass
class Stack(Services):
    """Services started from README commands, each README port replaced by a free one.

    Args:
        ports: The test's port for each port the README shows (``"4200"``, ...).
    """

    ports: dict[str, int] = field(default_factory=dict)

    def command(self, readme_line: str) -> tuple[list[str], dict[str, str]]:
        """A README command with the test's ports, split into argv and leading VAR=value.

        Args:
            readme_line: The command as the README shows it, checked to be there.
        """
        assert readme_line in README, f"README no longer shows: {readme_line}"
        for default, port in self.ports.items():
            readme_line = readme_line.replace(default, str(port))
        words = shlex.split(readme_line)
        extra = {}
        while "=" in words[0] and not words[0].startswith("-"):
            key, value = words.pop(0).split("=", 1)
            extra[key] = value.replace("$PWD", str(ROOT))
        return words, extra

    def run_readme(self, readme_line: str, cwd: Path | None = None, timeout: float = 120) -> str:
        """Run a README command to its end (:meth:`Services.run`); its output.

        Args:
            readme_line: The command as the README shows it.
            cwd: Where it runs (the workdir if None).
            timeout: Seconds it may take.
        """
        argv, extra = self.command(readme_line)
        return self.run(argv, cwd, timeout, **extra)

    def start_readme(self, name: str, readme_line: str, interrupts: int = 0) -> Service:
        """Start a README command in the background (:meth:`Services.start`).

        Args:
            name: The service's name.
            readme_line: The command as the README shows it.
            interrupts: SIGINTs that stop it (0: SIGTERM does).
        """
        argv, extra = self.command(readme_line)
        return self.start(name, argv, interrupts=interrupts, **extra)


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory):
    """The README's servers, pools, workers and ``prefect deploy --all``, once for the module."""
    workdir = tmp_path_factory.mktemp("stack")
    ports = {"4200": free_port(), "5000": free_port()}
    env = {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['4200']}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['5000']}",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers poll faster than the default 10 s
    }  # and the README's first server line: every Services process gets it (QUIET_ENV)
    stack = Stack(workdir, env, ports=ports)
    try:
        stack.start_readme("prefect-server", "prefect server start --host 127.0.0.1 --port 4200")
        stack.start_readme(
            "mlflow-server",
            "mlflow server --host 127.0.0.1 --port 5000 --workers 1 "
            "--backend-store-uri sqlite:///mlruns.db",
        )
        stack.wait_http(f"http://127.0.0.1:{ports['4200']}/api/health", "the Prefect server")
        stack.wait_http(f"http://127.0.0.1:{ports['5000']}/health", "the MLflow server")
        stack.run_readme("prefect work-pool create gpu --type process")
        stack.run_readme("prefect work-pool create cpu --type process")
        stack.start_readme(
            "worker-gpu",
            "CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1",
            WORKER_INTERRUPTS,
        )
        stack.start_readme("worker-cpu", "prefect worker start --pool cpu", WORKER_INTERRUPTS)
        deployed = stack.run_readme(
            "PWF_PROJECT_DIR=$PWD prefect --no-prompt deploy --all", cwd=ROOT
        )
        assert "pwf/full-sweep" in deployed and "pwf-experiment/gpu" in deployed
        yield stack
    finally:
        stack.stop_all()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_shipped_deployment_runs_to_completion(readme_stack):
    """Each deployment of prefect.yaml as ``prefect deployment run`` starts it: the sweeps'
    drivers on the cpu pool, their trials on the gpu pool, one trial of one replicate each on a
    tiny base, and a single experiment on ``pwf-experiment/gpu``, submitted at once; then
    ``pwf/full-sweep`` with the README's own command (``--watch``), two trials submitted
    together. Last, the README's schedule commands."""
    from tests.test_shipped_sweeps import tiny_overrides

    stack = readme_stack
    workdir = stack.workdir / "deployments"
    workdir.mkdir()
    # A second GPU's worker, as the README has one per GPU: the trials run two at a time.
    argv, extra = stack.command("CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1")
    stack.start(
        "worker-gpu-1",
        argv,
        interrupts=WORKER_INTERRUPTS,
        **(extra | {"CUDA_VISIBLE_DEVICES": "1"}),
    )
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    trials = {}  # each sweep's study: the trials it must complete
    submitted: dict[str, tuple[str, str | None]] = {}
    watched = ""
    # pwf/full-sweep last: its README command waits (--watch) while the others run.
    for deployment in sorted(deployments, key=lambda d: d["name"] == "full-sweep"):
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
            argv, target, study = ["prefect", "deployment", "run"], "pwf-experiment/gpu", None
            argv.append(target)
        else:
            sweep = ROOT / deployment["parameters"]["sweep"]
            study = f"deploy-{deployment['name']}"
            storage = f"sqlite:///{workdir / (study + '.db')}"
            trials[study] = 2 if deployment["name"] == "full-sweep" else 1
            fields = tiny_overrides(sweep, storage, workdir / "artifacts", n_trials=trials[study])
            fields |= {"name": study, "study.replicates": 1}  # one run: replicates test apart
            if deployment["name"] == "full-sweep":  # both at once; the workers queue them
                fields["execution.max_parallel"] = 2
                readme_run = (
                    "prefect deployment run pwf/full-sweep "
                    """--param overrides='{"study.n_trials": 24}' --watch"""
                )
                argv, _ = stack.command(readme_run)
                argv[argv.index("--param") + 1] = f"overrides={json.dumps(fields)}"
                argv += ["--watch-timeout", "780"]
                params = []
            else:
                argv = ["prefect", "deployment", "run", f"pwf/{deployment['name']}"]
                params = [f"overrides={json.dumps(fields)}"]
            target = f"pwf/{deployment['name']}"
        for param in params:
            argv += ["--param", param]
        output = stack.run(argv, cwd=workdir, timeout=840 if "--watch" in argv else 120)
        if "--watch" in argv:
            watched = output
        submitted[target] = (flow_run_id(output), study)
    assert len(submitted) == len(deployments) == 9
    assert "Completed" in watched, watched[-4000:]

    ended = stack.wait_flow_runs({t: run_id for t, (run_id, _) in submitted.items()}, 780)
    states = {target: state["type"] for target, state in ended.items()}
    assert states == dict.fromkeys(submitted, "COMPLETED"), states
    for study, count in trials.items():
        storage = f"sqlite:///{workdir / (study + '.db')}"
        found = optuna.load_study(study_name=study, storage=storage).get_trials()
        assert [t.state for t in found] == [TrialState.COMPLETE] * count, study
    experiments = stack.mlflow_api("experiments/search", {"max_results": 100})
    names = {e["name"]: e["experiment_id"] for e in experiments["experiments"]}
    for target, (_, study) in submitted.items():
        runs = stack.mlflow_api("runs/search", {"experiment_ids": [names[study or "deploy-gpu"]]})
        runs = runs["runs"]
        assert all(run["info"]["status"] == "FINISHED" for run in runs), target
        if study is None:
            assert len(runs) == 1, target
            continue
        # The sweep's parent run and one child run per trial, tagged with its number.
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
        (parent,) = [r for r, t in zip(runs, tags, strict=True) if t.get("kind") == "sweep"]
        children = [t for t in tags if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
        assert len(runs) == 1 + trials[study] == 1 + len(children), target
        assert {t["sweep.trial"] for t in children} == {str(n) for n in range(trials[study])}

    stack.run_readme(
        'prefect deployment schedule create pwf/ablation-regulariser --cron "0 2 * * 6" '
        "--timezone UTC"
    )
    schedules = stack.run_readme("prefect deployment schedule ls pwf/ablation-regulariser")
    assert "0 2 * * 6" in schedules
