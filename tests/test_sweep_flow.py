"""The pwf sweep flow: real Optuna storage, real Prefect, real MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from pwf_flows.cli import main as pwf_main
from pwf_flows.sweep.flow import pwf
from pwf_flows.sweep.report import importances, trials_table
from pwf_flows.sweep.spec import load_sweep
from pwf_flows.sweep.study import objective_values, sampler_for, tell
from tests._dummies.services import wait_until
from tests.conftest import DEFAULT_CONFIG, ROOT

TINY = {
    "pretrain.epochs": 3,
    "train.epochs": 0.25,
    "compression.schedule": [0.5, 1.0],
    "eval.mc_samples": 0,
}


def tiny_sweep(tmp_path: Path, name: str, n_trials: int = 3, **study) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "base": str(DEFAULT_CONFIG),
                "overrides": TINY,
                "space": {
                    "compression.reg": {"float": [1e-5, 1e-2], "log": True},
                    "compression.b": {"int": [4, 6]},
                },
                "study": {
                    "n_trials": n_trials,
                    "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                    "heartbeat_s": 1,
                    **study,
                },
                "execution": {"artifacts_dir": str(tmp_path / "artifacts")},
            }
        )
    )
    return path


def study_of(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def children_of(experiment: str, parent_run_id: str) -> list:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )


def complete(study: optuna.Study) -> list:
    return study.get_trials(states=(TrialState.COMPLETE,))


def dominated(row: pd.Series, table: pd.DataFrame) -> bool:
    better = (table["accuracy"] >= row["accuracy"]) & (
        table["unique_values"] <= row["unique_values"]
    )
    strictly = (table["accuracy"] > row["accuracy"]) | (
        table["unique_values"] < row["unique_values"]
    )
    return bool((better & strictly).any())


def test_tell_reports_objectives_in_the_studys_order(tmp_path):
    metrics = {"cls/acc": 0.9, "ws/unique_values": 30.0, "cls/nll": 0.3}
    for objectives in (["accuracy", "unique_values"], ["unique_values", "accuracy", "nll"]):
        spec = load_sweep(tiny_sweep(tmp_path, "order"), {"study.objectives": objectives})
        study = optuna.create_study(directions=spec.study.directions)
        trial = study.ask()
        tell(study, spec, trial.number, {"metrics": metrics, "mlflow_run_id": "abc"})
        (frozen,) = study.trials
        expected = {"accuracy": 0.9, "unique_values": 30.0, "nll": 0.3}
        assert frozen.values == [expected[name] for name in objectives]
        assert frozen.values == objective_values(spec, metrics)
        assert frozen.user_attrs["mlflow_run_id"] == "abc"
        assert dict(zip(objectives, spec.study.directions, strict=True))["accuracy"] == "maximize"


def test_a_continued_sweep_gets_a_new_sampler_seed(tmp_path):
    spec = load_sweep(tiny_sweep(tmp_path, "seeds"), {"study.sampler": "random"})
    draws = []
    for trials_so_far in (0, 0, 2):
        study = optuna.create_study(sampler=sampler_for(spec, trials_so_far))
        draws.append(study.ask().suggest_float("x", 0, 1))
    assert draws[0] == draws[1] != draws[2]


def test_importances_answer_for_the_direction_of_each_objective(tmp_path):
    """Accuracy is high only when a > 0.8, low only when b < 0.2: what drives *high* accuracy
    is a, although b decides the low end."""
    spec = load_sweep(tiny_sweep(tmp_path, "imp"), {"study.objectives": ["accuracy"]})
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(0))
    for _ in range(80):
        trial = study.ask()
        a, b = trial.suggest_float("a", 0, 1), trial.suggest_float("b", 0, 1)
        study.tell(trial, 0.5 + 0.4 * (a > 0.8) - 0.4 * (b < 0.2))
    found = importances(study, spec)["accuracy"]
    assert found["a"] > found["b"]
    few = optuna.create_study(directions=["maximize"])
    few.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    assert importances(few, spec) == {}  # too few trials: skipped, not a plot of noise


def test_a_choice_of_mixed_kinds_is_stored_as_text(tmp_path):
    """``gaussians: {choices: [1000, auto, 6000]}`` (sweeps/papers/2dgbnn-cifar10.yaml): one
    Parquet column holds one type, so the trials table stores the labels as text."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    kinds = optuna.distributions.CategoricalDistribution([1000, "auto", 6000])
    for k in (1000, "auto"):
        trial = optuna.trial.create_trial(
            params={"compression.gaussians": k},
            distributions={"compression.gaussians": kinds},
            values=[0.5, 1.0],
        )
        study.add_trial(trial)
    table = trials_table(study)
    table.to_parquet(tmp_path / "trials.parquet", index=False)
    read = pd.read_parquet(tmp_path / "trials.parquet")
    assert read["param.compression.gaussians"].tolist() == ["1000", "auto"]


@pytest.mark.integration
def test_three_trial_sweep(prefect_server, mlflow_store, tmp_path, capsys):
    path = tiny_sweep(tmp_path, "tiny")
    result = pwf(sweep=str(path))
    study = study_of(tmp_path, "tiny")
    trials = complete(study)
    assert len(trials) == 3 and result["complete_trials"] == 3
    assert study.metric_names == ["top-1", "unique values"]
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-tiny"
    children = {c.info.run_id: c for c in children_of("tiny", parent.info.run_id)}
    assert len(children) == 3
    for trial in trials:
        child = children[trial.user_attrs["mlflow_run_id"]]  # Optuna -> MLflow
        assert child.data.tags["sweep.trial"] == str(trial.number)
        assert child.info.run_name.startswith("pwfn ")  # what differs first
        assert child.info.run_name.endswith(f" (trial {trial.number})")
        assert f"b={trial.params['compression.b']}" in child.info.run_name
        assert f"reg={trial.params['compression.reg']:.3g}" in child.info.run_name
        final = child.data.metrics
        assert trial.values == [final["final/cls/acc"], final["final/ws/unique_values"]]
        with get_client(sync_client=True) as prefect:  # MLflow -> the trial's task run
            task_run = prefect.read_task_run(child.data.tags["prefect.task_run_id"])
        assert task_run.name == child.info.run_name
        assert str(task_run.flow_run_id) == child.data.tags["prefect.flow_run_id"]
    table = pd.read_parquet(tmp_path / "artifacts" / "sweeps" / "tiny" / "trials.parquet")
    assert len(table) == 3
    assert {"param.compression.reg", "param.compression.b", "mlflow_run_id"} <= set(table)
    for _, row in table.iterrows():
        assert row["pareto"] == (not dominated(row, table))
    metrics = parent.data.metrics
    assert metrics["sweep/best_accuracy"] == table["accuracy"].max()
    assert metrics["sweep/pareto_size"] == table["pareto"].sum()
    close = table[table["accuracy"] >= metrics["sweep/reference_accuracy"] - 0.01]
    if close.empty:
        assert "sweep/min_unique_values_within_1pt" not in metrics or pd.isna(
            metrics["sweep/min_unique_values_within_1pt"]
        )
    else:
        assert metrics["sweep/min_unique_values_within_1pt"] == close["unique_values"].min()
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/pareto_front.png"}  # 3 trials: importances are skipped
    # The trials share one pretraining.
    cached = sorted(c.data.tags["pretrain.cached"] for c in children.values())
    assert cached == ["False", "True", "True"]
    assert pwf_main(["sweep", str(path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "3 complete trials" in out and "pareto" in out


@pytest.mark.integration
def test_a_continued_sweep_explores_new_configurations(prefect_server, mlflow_store, tmp_path):
    path = tiny_sweep(tmp_path, "continued", n_trials=2)
    pwf(sweep=str(path))
    pwf(sweep=str(path), overrides={"study.n_trials": 4})
    study = study_of(tmp_path, "continued")
    configurations = [tuple(sorted(t.params.items())) for t in complete(study)]
    assert len(configurations) == 4 and len(set(configurations)) == 4
    table = pd.read_parquet(tmp_path / "artifacts" / "sweeps" / "continued" / "trials.parquet")
    assert sorted(table["trial"]) == sorted(t.number for t in complete(study))


def _sweep_command(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pwf_flows.cli", "sweep", str(path), "--no-progress", *extra]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_sweep_resumes_to_n_complete_trials(prefect_server, mlflow_store, tmp_path):
    """SIGKILLed mid-trial and run again (with the study renamed on the command line): exactly
    n complete trials, the lost one retried with its settings, and the killed driver's Prefect
    flow run and its trial's task run marked CRASHED instead of RUNNING for good."""
    path = tiny_sweep(tmp_path, "file-name", n_trials=3)
    command = _sweep_command(path, "--set", "name=resumed")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    with (tmp_path / "first.log").open("w") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"

        def one_done_and_the_next_asked() -> bool:
            try:
                study = optuna.load_study(study_name="resumed", storage=storage)
            except KeyError:
                return False
            trials = study.get_trials()  # one read: two could see one trial in both states
            running = [t for t in trials if t.state == TrialState.RUNNING]
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            return bool(done) and bool(running) and len(running[0].params) == 2

        wait_until(
            one_done_and_the_next_asked,
            "a complete trial and the next one's parameters",
            timeout=300,
            poll=0.2,
            processes=[process],
        )
        process.send_signal(signal.SIGKILL)
        process.wait()
    study = study_of(tmp_path, "resumed")
    assert len(complete(study)) < 3
    (interrupted,) = study.get_trials(states=(TrialState.RUNNING,))
    (driver,) = (tmp_path / "artifacts" / "sweeps" / "resumed" / "drivers").glob("*.json")
    killed_flow_run = json.loads(driver.read_text())["flow_run"]
    with get_client(sync_client=True) as prefect:
        killed = prefect.read_flow_run(killed_flow_run)
    assert killed.name == "sweep-resumed" and killed.state.type.value == "RUNNING"
    rerun = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    study = study_of(tmp_path, "resumed")
    assert len(complete(study)) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == interrupted.number
    assert interrupted.params in [t.params for t in complete(study)]  # retried, same values
    client = MlflowClient()
    experiment = client.get_experiment_by_name("resumed")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = children_of("resumed", parents[0].info.run_id)
    assert len({c.data.tags["sweep.trial"] for c in children}) == len(children)
    with get_client(sync_client=True) as prefect:
        killed = prefect.read_flow_run(killed_flow_run)
        left = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[killed_flow_run]))
        )
    assert killed.state.type.value == "CRASHED", killed.state
    assert [t.name for t in left if not t.state.is_final()] == []
    assert not list(driver.parent.glob("*.json"))  # the rerun's driver ended and left none


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_sweeps_on_one_study(database, prefect_server, tmp_path, request):
    """Started together on a fresh folder: no crash, exactly n complete and distinct trials."""
    study = {}
    if database == "postgresql":
        server = request.getfixturevalue("postgres")
        url = server.create_database(f"together_{tmp_path.name[-12:].replace('-', '_')}")
        study = {"storage": url}
    path = tiny_sweep(tmp_path, "together", n_trials=4, **study)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }
    processes = [
        subprocess.Popen(
            _sweep_command(path),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=800)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
        assert "UpdateFinishedTrialError" not in output
    storage = study.get("storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    done = complete(optuna.load_study(study_name="together", storage=storage))
    study = optuna.load_study(study_name="together", storage=storage)
    assert len(done) == 4 and len({tuple(sorted(t.params.items())) for t in done}) == 4
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING))
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("together")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'",
    )
    assert sorted(c.info.run_id for c in children) == sorted(
        t.user_attrs["mlflow_run_id"] for t in done
    )
    assert all(c.info.status == "FINISHED" for c in children)


def test_plots_name_the_method_a_sweep_tunes():
    from pwf_flows.sweep.report import method_label

    assert method_label(load_sweep(ROOT / "sweeps" / "full-sweep.yaml")) == "pwfn"
    assert method_label(load_sweep(ROOT / "sweeps" / "methods.yaml")) == "several methods"
