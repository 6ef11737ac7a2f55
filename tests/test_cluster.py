"""A cluster on real engines, on this machine: PostgreSQL for Prefect, MLflow and Optuna, a
Prefect server, an MLflow server that proxies artifacts, two process workers on the trial pool
(``--limit 1`` each, as one per GPU) and one on the driver pool; then sweeps run through
``prefect deployment run`` with workers and drivers killed in the middle.

Passwords reach the processes through the environment (``${PWF_TEST_PG_PASSWORD}`` in the
study URL), never through flow-run parameters.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pwf_flows.sweep.pool import FLOW_RUNS_ATTR
from tests._dummies.mlflow_store import assert_logged_once
from tests._dummies.postgres import PASSWORD, Postgres
from tests._dummies.services import (
    Services,
    flow_run_id,
    free_port,
    mlflow_server_argv,
    prefect_server_argv,
)
from tests.conftest import ROOT

TINY = {
    "pretrain.epochs": 3,
    "train.epochs": 0.25,
    "compression.schedule": [0.5, 1.0],
    "eval.mc_samples": 0,
}
SPACE = {
    "compression.b": {"int": [3, 6]},
    "compression.reg": {"float": [1e-5, 1e-2], "log": True},
}
pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Cluster(Services):
    """The servers and workers, with the sweeps run on them and their studies on PostgreSQL."""

    def __init__(self, workdir: Path, postgres: Postgres) -> None:
        self.postgres = postgres
        self.ports = {"prefect": free_port(), "mlflow": free_port()}
        self.optuna_url = postgres.url("optuna").replace(PASSWORD, "${PWF_TEST_PG_PASSWORD}")
        super().__init__(
            workdir,
            env={
                "PREFECT_HOME": str(workdir / ".prefect"),
                "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PWF_TEST_PG_PASSWORD": PASSWORD,
            },
        )

    def overrides(
        self, name: str, n_trials: int, max_parallel: int, replicates: int = 1, **experiment
    ) -> str:
        return json.dumps(
            {
                "name": name,
                "study.n_trials": n_trials,
                "study.replicates": replicates,
                "study.storage": self.optuna_url,
                "study.heartbeat_s": 2,
                "execution.artifacts_dir": str(self.workdir / "artifacts"),
                "execution.max_parallel": max_parallel,
                "overrides": {**TINY, **experiment},
                "space": SPACE,
            }
        )

    def sweep(self, name: str, overrides: str, watch: bool = True) -> str:
        argv = [
            "prefect",
            "deployment",
            "run",
            "pwf/full-sweep",
            "--param",
            f"overrides={overrides}",
        ]
        if watch:
            argv += ["--watch", "--watch-timeout", "600"]
        return self.run(argv, timeout=660)

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.postgres.url("optuna"))


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    for database in ("prefect", "mlflow", "optuna"):
        postgres.create_database(database)
    stack = Cluster(workdir, postgres)
    try:
        stack.start(
            "prefect-server",
            prefect_server_argv(stack.ports["prefect"]),
            PREFECT_API_DATABASE_CONNECTION_URL=postgres.url("prefect", "postgresql+asyncpg"),
        )
        stack.start(
            "mlflow-server",
            mlflow_server_argv(
                stack.ports["mlflow"],
                postgres.url("mlflow"),
                "--serve-artifacts",
                "--artifacts-destination",
                str(workdir / "mlartifacts"),
            ),
        )
        stack.wait_http(f"{stack.env['PREFECT_API_URL']}/health", "Prefect", timeout=240)
        stack.wait_http(f"{stack.env['MLFLOW_TRACKING_URI']}/health", "MLflow", timeout=240)
        for pool in ("gpu", "cpu"):
            stack.run(["prefect", "work-pool", "create", pool, "--type", "process"])
        stack.worker("worker-gpu-0", "gpu", 1)
        stack.worker("worker-gpu-1", "gpu", 1)
        stack.worker("worker-cpu", "cpu", 2)
        stack.run(
            ["prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, PWF_PROJECT_DIR=str(ROOT)
        )
        yield stack
    finally:
        stack.stop_all()


def trial_flow_runs(cluster: Cluster, study: optuna.Study) -> list[dict]:
    """The Prefect flow runs the study's trials were submitted as (REST API)."""
    ids = [run for t in study.trials for run in t.user_attrs.get(FLOW_RUNS_ATTR, {}).values()]
    return cluster.prefect_api("flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})


def mlflow_children(cluster: Cluster, experiment: str) -> tuple[list, list]:
    client = MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("kind") != "sweep"]


def distinct_configurations(trials: list) -> int:
    return len({tuple(sorted(t.params.items())) for t in trials})


def test_two_workers_run_replicates_at_once_exactly_once(cluster):
    """Two trials of two replicates each on two GPU workers: four flow runs, two at a time; each
    trial's MLflow run over its replicates' runs, Optuna told their mean."""
    overrides = cluster.overrides("parallel", n_trials=2, max_parallel=2, replicates=2)
    cluster.sweep("parallel", overrides)
    study = cluster.study("parallel")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2 and distinct_configurations(complete) == 2
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING))
    parents, children = mlflow_children(cluster, "parallel")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = {c.info.run_id: c for c in children if c.data.tags["kind"] == "trial"}
    replicates = [c for c in children if c.data.tags["kind"] == "experiment"]
    assert sorted(trials) == sorted(t.user_attrs["mlflow_run_id"] for t in complete)
    assert all(c.info.status == "FINISHED" for c in children)
    for trial in complete:
        mine = [
            r
            for r in replicates
            if r.data.tags["mlflow.parentRunId"] == trial.user_attrs["mlflow_run_id"]
        ]
        assert sorted(r.data.tags["replicate"] for r in mine) == ["0", "1"]
        accuracy = [r.data.metrics["final/cls/acc"] for r in mine]
        assert trial.values[0] == pytest.approx(sum(accuracy) / 2)
    assert sum(c.data.tags["pretrain.cached"] == "True" for c in replicates) >= 2  # shared cache
    runs = trial_flow_runs(cluster, study)
    assert len(runs) == 4 and all(r["state"]["type"] == "COMPLETED" for r in runs)
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    overlapping = any(b[0] < a[1] for a, b in itertools.pairwise(spans))
    assert overlapping, f"no two replicates ran at the same time: {spans}"
    # Artifacts went through the MLflow server's proxy, not a shared path.
    client = MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])
    assert client.get_run(replicates[0].info.run_id).info.artifact_uri.startswith(
        "mlflow-artifacts:"
    )
    assert (cluster.workdir / "mlartifacts").is_dir()
    # The study's password never reached Prefect's parameters.
    assert all(PASSWORD not in json.dumps(r["parameters"]) for r in runs)
    assert_logged_once(cluster.postgres.url("mlflow"))


SLOW = {"compression.schedule": [0.2, 0.4, 0.6, 0.8, 1.0], "train.epochs": 3.0}


def flow_runs_of_study(cluster: Cluster, name: str) -> list[dict]:
    """Every trial flow run any driver submitted for sweep ``name``."""
    runs = cluster.prefect_api("flow_runs/filter", {"limit": 200})
    return [
        r
        for r in runs
        if (r.get("parameters") or {}).get("config", {}).get("name") == name
        and (r.get("parameters") or {}).get("trial")
    ]


def kill_flow_run(cluster: Cluster, run_id: str) -> None:
    """SIGKILL the process a worker started for flow run ``run_id``."""
    run = cluster.prefect_api(f"flow_runs/{run_id}")
    os.kill(int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1]), signal.SIGKILL)


def wait_for_driver(cluster: Cluster, run_id: str, timeout: float = 600) -> dict:
    name = f"driver {run_id}"
    return cluster.wait_flow_runs({name: run_id}, timeout)[name]


def test_a_killed_worker_trial_is_retried_and_resumes(cluster):
    """One trial; its worker's host goes down mid-trial. The trial is marked failed, queued
    again, and the next worker resumes it from its checkpoint into the same MLflow run."""
    name = "killed-worker"
    overrides = cluster.overrides(name, n_trials=1, max_parallel=1, **SLOW)
    driver = flow_run_id(cluster.sweep(name, overrides, watch=False))
    experiments = cluster.workdir / "artifacts" / "experiments" / name
    cluster.wait_for(lambda: any(experiments.glob("*/step_01.safetensors")), "a finished round")
    (lost,) = cluster.study(name).get_trials(states=(TrialState.RUNNING,))
    # The worker's host goes down: the worker and the flow run it started die together.
    (lost_run,) = lost.user_attrs[FLOW_RUNS_ATTR].values()  # one replicate
    kill_flow_run(cluster, lost_run)
    cluster.kill("worker-gpu-0")
    cluster.kill("worker-gpu-1")
    cluster.worker("worker-gpu-2", "gpu", 1)
    cluster.worker("worker-gpu-3", "gpu", 1)
    assert wait_for_driver(cluster, driver)["type"] == "COMPLETED"
    study = cluster.study(name)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [lost.number]  # marked failed, not lost
    (retried,) = complete
    assert retried.params == lost.params  # ... and retried
    _, children = mlflow_children(cluster, name)
    (resumed,) = children  # one MLflow run for the trial, before and after the kill
    assert resumed.info.status == "FINISHED"
    assert resumed.info.run_id == retried.user_attrs["mlflow_run_id"]
    assert resumed.data.tags["resumed_at"].startswith("round ")  # from the lost run's checkpoint
    states = {r["id"]: r["state"]["type"] for r in flow_runs_of_study(cluster, name)}
    assert states[lost_run] == "CRASHED"
    assert_logged_once(cluster.postgres.url("mlflow"))  # the resumed trial logged nothing twice


def test_a_rerun_driver_adopts_trials_still_running_on_workers(cluster):
    name = "killed-driver"
    overrides = cluster.overrides(name, n_trials=2, max_parallel=2, **SLOW)
    first = flow_run_id(cluster.sweep(name, overrides, watch=False))

    def both_running() -> bool:
        try:
            running = cluster.study(name).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            return False
        runs = [r for r in flow_runs_of_study(cluster, name) if r["state"]["type"] == "RUNNING"]
        return len(running) == 2 and len(runs) == 2

    cluster.wait_for(both_running, "two trials running on the workers")
    kill_flow_run(cluster, first)  # the sweep driver dies; its trials go on
    cluster.kill("worker-cpu")
    cluster.worker("worker-cpu-2", "cpu", 2)
    cluster.sweep(name, overrides)  # the same deployment again, watched to the end
    study = cluster.study(name)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2 and distinct_configurations(complete) == 2
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING))
    assert len(flow_runs_of_study(cluster, name)) == 2  # adopted, not submitted again
    parents, children = mlflow_children(cluster, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert_logged_once(cluster.postgres.url("mlflow"))
