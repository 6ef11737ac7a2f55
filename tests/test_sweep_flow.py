"""The pwf sweep flow, in-process: a real Optuna sqlite study, real Prefect, real MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from flows.cli import main as pwf_main
from flows.sweep import pwf
from tests.conftest import DEFAULT_CONFIG

TINY = {
    "pretrain.epochs": 3,
    "train.epochs": 0.25,
    "fixing.schedule": [0.5, 1.0],
    "eval.mc_samples": 0,
}


def tiny_sweep(tmp_path: Path, name: str, n_trials: int = 3) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "base": str(DEFAULT_CONFIG),
                "overrides": TINY,
                "space": {
                    "fixing.reg": {"float": [1e-5, 1e-2], "log": True},
                    "fixing.b": {"int": [4, 6]},
                },
                "study": {"n_trials": n_trials, "storage": f"sqlite:///{tmp_path / 'optuna.db'}"},
                "execution": {"artifacts_dir": str(tmp_path / "artifacts")},
            }
        )
    )
    return path


def study_of(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.integration
def test_three_trial_sweep(prefect_server, mlflow_store, tmp_path, capsys):
    path = tiny_sweep(tmp_path, "tiny")
    result = pwf(sweep=str(path))
    study = study_of(tmp_path, "tiny")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert result["complete_trials"] == 3 and result["pareto"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny")
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert len(children) == 3 and parent.info.status == "FINISHED"
    assert {c.data.tags["sweep.trial"] for c in children} == {"0", "1", "2"}
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert logged == {"tables/trials.parquet"}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in plots
    table = pd.read_parquet(tmp_path / "artifacts" / "sweeps" / "tiny" / "trials.parquet")
    assert len(table) == 3 and table["pareto"].any()
    assert {"param.fixing.reg", "param.fixing.b", "accuracy", "unique_values"} <= set(table)
    # The trials share one pretraining.
    cached = sorted(c.data.tags["pretrain.cached"] for c in children)
    assert cached == ["False", "True", "True"]
    assert pwf_main(["sweep", str(path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "3 complete trials" in out and "pareto" in out


@pytest.mark.integration
@pytest.mark.slow
def test_interrupted_sweep_resumes_to_n_complete_trials(prefect_server, mlflow_store, tmp_path):
    path = tiny_sweep(tmp_path, "resumed", n_trials=3)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    command = [sys.executable, "-m", "flows.cli", "sweep", str(path)]
    with (tmp_path / "first.log").open("w") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 240
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        while True:
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial completed"
            try:
                study = optuna.load_study(study_name="resumed", storage=storage)
                complete = study.get_trials(states=(TrialState.COMPLETE,))
                if complete and study.get_trials(states=(TrialState.RUNNING,)):
                    break  # one trial done, the next one in flight
            except KeyError:
                pass
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
    study = study_of(tmp_path, "resumed")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) < 3
    (interrupted,) = study.get_trials(states=(TrialState.RUNNING,))
    rerun = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    study = study_of(tmp_path, "resumed")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == interrupted.number
    assert interrupted.params in [t.params for t in complete]  # retried with the same values
    client = MlflowClient()
    experiment = client.get_experiment_by_name("resumed")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
