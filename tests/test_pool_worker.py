"""A worker's job ending under a trial: the trial's flow run hands it back to the study, and
the batch worker (``python -m pwf_flows.pool_worker``) refuses bad arguments in one line. The
whole path on a real Slurm cluster is tests/test_slurm.py."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from pwf_flows.infra import StudyStorageUnavailable
from pwf_flows.pool_worker import main as pool_worker
from pwf_flows.sweep.trials import owned_trial, quiet_optuna, storage_for


def running_trial(tmp_path, name: str) -> tuple[dict, optuna.Study]:
    """A study with one running trial, and the ``trial`` parameter a driver gives its flow run."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with quiet_optuna():
        study = optuna.create_study(study_name=name, storage=storage_for(url, 2))
        trial = study.ask()
        trial.suggest_int("compression.b", 3, 6)
    return {"storage": url, "study": name, "number": trial.number, "heartbeat_s": 2}, study


@pytest.mark.parametrize(
    "stop",
    [KeyboardInterrupt, lambda: StudyStorageUnavailable("the study database went away")],
    ids=["interrupt", "outage"],
)
def test_a_trial_told_to_stop_queues_itself_again(tmp_path, stop):
    """SIGTERM from a scheduler (pwf's handler and Prefect's raise an interrupt) or an outage
    past its budget: the trial is failed and queued again with the same parameters at once."""
    trial, study = running_trial(tmp_path, "stopped")
    with pytest.raises((KeyboardInterrupt, StudyStorageUnavailable)), owned_trial(trial) as run:
        assert run
        raise stop()
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.params == first.params


def test_a_trial_that_fails_is_not_queued_again(tmp_path):
    """A bug is a result, not an outage: the trial stays running for its driver to record the
    failed flow run."""
    trial, study = running_trial(tmp_path, "failed")
    with pytest.raises(ValueError), owned_trial(trial):
        raise ValueError("a bug")
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--idle-exit", "0"]])
def test_the_pool_worker_refuses_bad_arguments(argv, capsys):
    assert pool_worker(["--pool", "gpu", *argv]) == 2
    assert capsys.readouterr().err.startswith("pwf: --limit must be at least 1")
