"""Optuna trials across processes: the storage with heartbeats, and who keeps a trial alive.

A running trial has an owner that records its heartbeat: the sweep driver while the trial runs
in the driver's process or waits in a work pool's queue, the trial's own flow run (on a worker)
once it runs there. A trial whose heartbeat stops for three intervals lost its owner: any
driver fails it and queues its parameters again (Optuna's stale-trial callback), and the retry
resumes from the experiment's checkpoints. A trial's flow run that finds its trial no longer
running (failed, or finished by someone else) does nothing.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pwf_flows.sweep_spec import expand_storage
from pwf_flows.tracking import sqlite_creation_lock

MAX_RETRIES = 3


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Heartbeats with ask/tell and metric names are what pwf means to use; Optuna warns that
    they are experimental (and that heartbeats are meant for ``optimize``) on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def storage_for(url: str, heartbeat_s: int) -> RDBStorage:
    """The study's database with heartbeats on; a trial whose heartbeat stops is retried."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with sqlite_creation_lock(url), quiet_optuna():
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_s,
            grace_period=3 * heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )


class Heartbeats:
    """Records a heartbeat for every trial this process owns, from one background thread."""

    def __init__(self, study: optuna.Study, interval: float) -> None:
        self.storage = study._storage
        self.interval = interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="pwf-heartbeats")

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def own(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                owned = list(self.trial_ids)
            for trial_id in owned:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a busy database must not kill the heartbeat thread
                    continue


@contextmanager
def owned_trial(trial: dict[str, Any] | None) -> Iterator[bool]:
    """Heartbeat a sweep's trial from the flow run that computes it.

    Args:
        trial: ``{"storage": url, "study": name, "number": n, "heartbeat_s": s}`` as the driver
            passed it (the URL may hold ``${VAR}`` references, filled in here), or ``None``.

    Yields:
        Whether the trial is still running, i.e. whether to compute it at all.
    """
    if trial is None:
        yield True
        return
    storage = storage_for(expand_storage(trial["storage"]), int(trial["heartbeat_s"]))
    study_id = storage.get_study_id_from_name(trial["study"])
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(trial["number"]))
    if storage.get_trial(trial_id).state != TrialState.RUNNING:
        yield False
        return
    study = optuna.load_study(study_name=trial["study"], storage=storage)
    with Heartbeats(study, int(trial["heartbeat_s"])) as heartbeats:
        heartbeats.own(trial_id)
        yield True
