"""Replicates and early stopping end to end, as a user runs them: a sweep whose trials run
under two seeds, one of them stopped part way, killed with SIGKILL in the middle of a
replicate and run again; and ``pwf run --replicates``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from scipy import stats

from pwf_flows.cli import main as pwf_main
from pwf_flows.sweep.early_stopping import rounds_key
from pwf_flows.sweep.study import STOPPED_ATTR, trials_done
from tests._dummies.mlflow_store import assert_logged_once
from tests._dummies.services import wait_until
from tests.conftest import DEFAULT_CONFIG

TINY = {
    "pretrain.epochs": 2,
    "train.epochs": 0.1,
    "compression.schedule": [0.5, 1.0],
    "eval.mc_samples": 0,
}


def _sweep(tmp_path: Path) -> Path:
    """Three settings of b, two replicates each, three rounds; the objective is the unique
    values alone, so b = 4 (most weights below 2^-4 go to 0) beats b = 6 and b = 8 at every
    round, and the rule decides from round 2 on."""
    path = tmp_path / "replicated.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "replicated",
                "base": str(DEFAULT_CONFIG),
                "overrides": TINY | {"train.epochs": 1, "compression.schedule": [0.3, 0.6, 1]},
                "space": {"compression.b": {"choices": [4, 6, 8]}},
                "study": {
                    "objectives": ["unique_values"],
                    "sampler": "random",
                    "n_trials": 3,
                    "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                    "heartbeat_s": 1,
                    "replicates": 2,
                    "early_stopping": {"from_round": 2, "min_dominating": 1, "margins": {}},
                },
                "execution": {"artifacts_dir": str(tmp_path / "artifacts")},
            }
        )
    )
    return path


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="replicated", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _command(path: Path) -> list[str]:
    return [sys.executable, "-m", "pwf_flows.cli", "sweep", str(path), "--no-progress"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_replicated_sweep_with_early_stopping_killed_mid_replicate_ends_whole(
    prefect_server, mlflow_store, tmp_path
):
    path = _sweep(tmp_path)
    study = optuna.create_study(
        study_name="replicated",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        directions=["minimize"],
    )
    for b in (4, 8, 6):  # the order the trials run in
        study.enqueue_trial({"compression.b": b})
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    with (tmp_path / "first.log").open("w") as log:
        process = subprocess.Popen(
            _command(path), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )

        def second_trial_past_its_first_round() -> bool:
            trials = _study(tmp_path).trials
            return trials[0].state == TrialState.COMPLETE and any(
                t.state == TrialState.RUNNING and t.user_attrs.get(rounds_key(0)) for t in trials
            )

        # Killed after round 1 of trial 1 (b = 8), before round 2 where b = 4 would stop it.
        wait_until(
            second_trial_past_its_first_round,
            "trial 0 to complete and trial 1 to finish its first round",
            timeout=600,
            poll=0.1,
            processes=[process],
        )
        process.send_signal(signal.SIGKILL)
        process.wait()
    rerun = subprocess.run(
        _command(path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert "; for 6 runs)" in output  # the disk it needs: 3 trials of 2 replicates

    study = _study(tmp_path)
    done = trials_done(study)
    assert len(done) == 3, [(t.number, t.state, t.params) for t in study.trials]
    complete = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    stopped = [t for t in done if t.state == TrialState.PRUNED]
    assert stopped, "no trial was stopped early"
    assert f"early stopping: {len(stopped)} trials stopped part way" in output
    for trial in stopped:
        decision = trial.user_attrs[STOPPED_ATTR]
        assert decision["round"] == 2 and decision["saved_s"] > 0
        assert set(decision["by"]) <= set(complete)  # beaten by completed trials only...
        mine = trial.user_attrs[rounds_key(0)][0][0]
        for number in decision["by"]:  # ...with fewer values at the same round
            theirs = [
                rows[0][0]
                for k, rows in complete[number].user_attrs.items()
                if k.startswith("rounds.")
            ]
            assert sum(theirs) / len(theirs) < mine
        assert rounds_key(1) not in trial.user_attrs  # its second replicate was never run
    (failed,) = study.get_trials(states=(TrialState.FAIL,))  # the one the kill interrupted
    assert failed.params == {"compression.b": 8}
    (retry,) = [t for t in done if t.params == failed.params]  # resumed, then stopped
    assert (
        retry.state == TrialState.PRUNED
        and retry.user_attrs["mlflow_run_id"] == (failed.user_attrs["mlflow_run_id"])
    )
    assert [t.params for t in complete.values()] == [{"compression.b": 4}]

    client = MlflowClient()
    experiment = client.get_experiment_by_name("replicated").experiment_id
    runs = client.search_runs([experiment])
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags.get("kind") == "trial"}
    replicate_runs = [r for r in runs if r.data.tags.get("kind") == "experiment"]
    assert len(trial_runs) == 3  # one per setting: the retried trial reopened its own
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs.values()} == {parent.info.run_id}
    children: dict[str, list] = {run_id: [] for run_id in trial_runs}
    for run in replicate_runs:
        children[run.data.tags["mlflow.parentRunId"]].append(run)
    for trial in complete.values():  # both replicates, each once; Optuna got their mean
        mine = children[trial.user_attrs["mlflow_run_id"]]
        assert sorted(r.data.tags["replicate"] for r in mine) == ["0", "1"]
        values = [r.data.metrics["final/ws/unique_values"] for r in mine]
        assert trial.values == [pytest.approx(sum(values) / 2)]
        assert trial.user_attrs["unique_values_n"] == 2
        trial_run = trial_runs[trial.user_attrs["mlflow_run_id"]]
        assert trial_run.data.metrics["final/ws/unique_values"] == pytest.approx(sum(values) / 2)
        if values[0] != values[1]:
            low, high = stats.t.interval(0.95, 1, loc=sum(values) / 2, scale=stats.sem(values))
            assert trial.user_attrs["unique_values_ci95"] == pytest.approx([low, high])
    for trial in stopped:  # one replicate, ended FINISHED where it stopped, no checkpoint left
        (run,) = children[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["early_stopped.round"] == "2"
        assert "final/cls/acc" not in run.data.metrics  # no final evaluation was paid for
        folder = Path(run.data.tags["artifacts"])
        assert not list(folder.glob("*.safetensors")) and (folder / "early_stopped.json").is_file()
        assert trial_runs[trial.user_attrs["mlflow_run_id"]].data.tags["early_stopped.round"] == "2"
    assert parent.data.metrics["sweep/early_stopped"] == len(stopped)
    assert parent.data.metrics["sweep/saved_s"] > 0
    assert_logged_once(mlflow_store)


@pytest.mark.integration
def test_pwf_run_replicates_share_the_pretrained_model_and_say_their_interval(
    prefect_server, mlflow_store, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    config = tmp_path / "config.yaml"
    values = yaml.safe_load(DEFAULT_CONFIG.read_text())
    values["name"] = "replicated-run"
    config.write_text(yaml.safe_dump(values))
    argv = [
        "run",
        str(config),
        "--replicates",
        "2",
        "--no-progress",
        "--artifacts",
        str(tmp_path / "a"),
    ]
    argv += [f"--set={key}={value}" for key, value in TINY.items()]
    assert pwf_main(argv) == 0
    out = capsys.readouterr().out
    client = MlflowClient()
    experiment = client.get_experiment_by_name("replicated-run").experiment_id
    runs = sorted(client.search_runs([experiment]), key=lambda r: r.data.tags["replicate"])
    assert [r.data.tags["replicate"] for r in runs] == ["0", "1"]
    assert len({r.data.tags["setting"] for r in runs}) == 1
    assert [r.data.tags["pretrain.cached"] for r in runs] == ["False", "True"]
    accuracies = [100 * r.data.metrics["final/cls/acc"] for r in runs]
    mean = sum(accuracies) / 2
    assert f"top-1: {mean:.2f} %" in out
    if accuracies[0] != accuracies[1]:
        low, high = stats.t.interval(0.95, 1, loc=mean, scale=stats.sem(accuracies))
        assert f"95 % interval {low:.2f} to {high:.2f}, n = 2" in out
    assert pwf_main(argv) == 0  # a rerun finds both finished and changes nothing
    assert len(client.search_runs([experiment])) == 2
