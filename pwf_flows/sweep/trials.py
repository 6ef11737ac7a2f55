"""Optuna trials across processes: the storage with heartbeats, and who keeps a trial alive.

A running trial has an owner that records its heartbeat: the sweep driver while the trial runs
in the driver's process or waits in a work pool's queue, the trial's own flow run (on a worker)
once it runs there. A trial whose heartbeat stops for three intervals lost its owner: any
driver fails it and queues its parameters again (Optuna's stale-trial callback), and the retry
resumes from the experiment's checkpoints. A trial's flow run that finds its trial no longer
running (failed, or finished by someone else) does nothing, and one whose process is told to
stop (a scheduler's SIGTERM) queues its trial again before it exits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pwf_flows.infra import (
    InfraUnavailable,
    StudyStorageUnavailable,
    is_interrupt,
    is_transient,
    retry_transient,
)
from pwf_flows.sweep.spec import connect_args, expand_storage, masked_url
from pwf_flows.tracking import sqlite_creation_lock

MAX_RETRIES = 3
# Storage calls that read or write the study; each is safe to repeat after a failed attempt
# (a commit that failed wrote nothing). Heartbeats are left out: the heartbeat thread skips a
# missed beat instead of waiting, so it never holds up the command's exit.
_RETRIED = (
    "create_new_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "_get_stale_trial_ids",
)


class RetryingStorage(RDBStorage):
    """Optuna's RDB storage whose calls wait out an outage of the database.

    A PostgreSQL failover or restart turns into a pause of the sweep (retried with backoff for
    ``infra_timeout_s``) instead of a failed trial or a crashed driver. ``last_outage_end``
    records when an outage this process saw ended: until every owner had time to beat again,
    a trial's stale heartbeat means the database was away, not that its owner died.
    """

    last_outage_end: float = 0.0

    def _retried(self, name: str, method, *args: Any, **kwargs: Any) -> Any:
        attempts = 0

        def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            try:
                return method(self, *args, **kwargs)
            except UpdateFinishedTrialError:
                # A state write whose commit reached the database before the connection broke
                # is repeated onto a finished trial: it is done if the state is the one asked.
                if attempts > 1 and name == "set_trial_state_values":
                    trial = RDBStorage.get_trial(self, args[0])
                    if trial.state == kwargs.get("state", args[1] if len(args) > 1 else None):
                        return True
                raise
            except Exception as err:
                if is_transient(err):
                    self.last_outage_end = time.time()
                raise

        result = retry_transient(
            attempt, f"the study database {masked_url(self.url)}", StudyStorageUnavailable
        )
        if attempts > 1:
            self.last_outage_end = time.time()
        return result


def _retrying(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retried(name, method, *args, **kwargs)

    return call


for _name in _RETRIED:
    setattr(RetryingStorage, _name, _retrying(_name))


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Heartbeats with ask/tell and metric names are what pwf means to use; Optuna warns that
    they are experimental (and that heartbeats are meant for ``optimize``) on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def storage_for(url: str, heartbeat_s: int) -> RetryingStorage:
    """The study's database with heartbeats on; a trial whose heartbeat stops is retried.

    Raises:
        StudyStorageUnavailable: when the database stays unreachable past the outage budget.
    """
    engine_kwargs: dict[str, Any] = {"connect_args": connect_args(url)}
    if not url.startswith("sqlite"):  # a connection the server dropped (a restart) is
        engine_kwargs["pool_pre_ping"] = True  # replaced, not handed out broken

    def connect() -> RetryingStorage:
        with sqlite_creation_lock(url), quiet_optuna():
            return RetryingStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRIES
                ),
            )

    return retry_transient(
        connect, f"the study database {masked_url(url)}", StudyStorageUnavailable
    )


def requeue(study: optuna.Study, number: int) -> None:
    """Fail trial ``number`` and queue its parameters again (a retry resumes its experiment).

    What the stale-heartbeat check does for a trial whose process died, done at once for a
    trial this process gives up (an interrupt, an outage that outlasted its budget).
    """
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    with contextlib.suppress(UpdateFinishedTrialError):
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        callback(study, copy.deepcopy(storage.get_trial(trial_id)))


def fail_stale(study: optuna.Study, owned: set[int] | None = None) -> list[int]:
    """Fail (and queue again) the running trials whose owner's heartbeat stopped.

    Optuna's ``fail_stale_trials`` with two guards: the trials this process owns are never
    stale (it is alive), and right after an outage of the database nothing is, because every
    owner's heartbeat missed its beats at once.

    Returns:
        The numbers of the trials that were failed and queued again.
    """
    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # Optuna wraps the RDB storage in a cache
    grace = getattr(backend, "grace_period", None) or 0
    if time.time() < getattr(backend, "last_outage_end", 0.0) + grace:
        return []
    failed = []
    with quiet_optuna():
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            if trial_id in (owned or set()):
                continue
            with contextlib.suppress(UpdateFinishedTrialError):
                if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    failed.append(trial_id)
        callback = storage.get_heartbeat_stale_trial_callback()
        numbers = []
        for trial_id in failed:
            trial = copy.deepcopy(storage.get_trial(trial_id))
            numbers.append(trial.number)
            if callback is not None:
                callback(study, trial)
    return sorted(numbers)


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
        with contextlib.suppress(Exception):  # a missed beat is retried by the thread
            self.storage.record_heartbeat(trial_id)

    def owned(self) -> set[int]:
        with self._lock:
            return set(self.trial_ids)

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
        trial: ``{"storage": url, "study": name, "number": n, "heartbeat_s": s, "heartbeat":
            bool}`` as the driver passed it (the URL may hold ``${VAR}`` references, filled in
            here), or ``None``. With ``heartbeat`` false (an in-process trial) the driver
            keeps the heartbeat.

    Yields:
        Whether the trial is still running, i.e. whether to compute it at all.
    """
    if trial is None or not trial.get("heartbeat", True):
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
        try:
            yield True
        except BaseException as err:
            # A worker's job ends (SIGTERM from a scheduler, Ctrl-C) or an outage outlasts its
            # budget: the trial is queued again now, with the same parameters, for the next
            # worker to resume from its checkpoints, instead of after its heartbeat goes stale.
            if isinstance(err, InfraUnavailable) or is_interrupt(err):
                with contextlib.suppress(InfraUnavailable):
                    requeue(study, int(trial["number"]))
            raise
