"""The one place that talks to MLflow.

Runs are driven through ``MlflowClient`` with explicit run ids (no global "active run"), so a
resumed experiment reopens its own run, and sweep trials are nested under their sweep's run by
the ``mlflow.parentRunId`` tag. :func:`tracked_run` owns a run's status: whatever happens
inside it, the run ends FINISHED, FAILED or KILLED, never RUNNING.
"""

from __future__ import annotations

import contextlib
import getpass
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from sqlalchemy.engine import make_url

from pwf_core._files import file_lock
from pwf_flows.errors import TrackingError
from pwf_flows.infra import TrackingUnavailable, is_interrupt, retry_transient
from pwf_flows.links import run_url

T = TypeVar("T")
MAX_BATCH = 900  # MLflow accepts at most 1000 entities per log_batch call
# MLflow 3 opens an experiment in its GenAI view (traces) unless the experiment says it holds
# model training; every pwf experiment does, so every link lands on its runs.
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_VIEW = {EXPERIMENT_KIND: "custom_model_development"}
INTERRUPTED_STATUS_WAIT_S = 5.0


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI as pwf prints it: a password in it is masked."""
    uri = uri or tracking_uri()
    try:
        parsed = make_url(uri) if "://" in uri and not uri.startswith("http") else None
    except Exception:  # not a database URL: an HTTP one, handled below
        parsed = None
    if parsed is not None:
        return parsed.render_as_string(hide_password=True)
    scheme, sep, rest = uri.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return uri
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def retried(call: Callable[[], T], what: str = "call") -> T:
    """``call()`` with outages of the tracking store waited out (see :mod:`pwf_flows.infra`).

    Raises:
        TrackingUnavailable: once an outage outlasted the process's budget.
    """
    return retry_transient(call, f"MLflow at {shown_uri()} ({what})", TrackingUnavailable)


@contextmanager
def sqlite_creation_lock(uri: str) -> Iterator[None]:
    """Serialise the first opening of a SQLite store between processes.

    Two sweeps started at once on a fresh folder both create MLflow's tables; without the lock
    one of them crashes in the middle of the other's migration.
    """
    if not uri.startswith("sqlite:"):
        yield
        return
    database = make_url(uri).database
    if not database:
        yield
        return
    with file_lock(Path(database).with_suffix(".lock")):
        yield


@cache
def _client_for(uri: str) -> MlflowClient:
    with sqlite_creation_lock(uri):
        client = MlflowClient(uri)
        # Creates the tables (a SQLite store) while the lock is held.
        retried(lambda: client.search_experiments(max_results=1), "connect")
    return client


def client() -> MlflowClient:
    """A client for the current tracking URI (its store created safely)."""
    return _client_for(tracking_uri())


def git_commit(cwd: Path | None = None) -> str:
    """The checkout's commit, or ``unknown`` outside a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """Id of the MLflow experiment ``name``, created when missing (safe against races).

    Raises:
        TrackingError: when the experiment exists but was deleted (it sits in the trash).
    """
    existing = retried(lambda: mlflow_client.get_experiment_by_name(name), "experiment")
    if existing is None:
        try:
            return retried(
                lambda: mlflow_client.create_experiment(name, tags=TRAINING_VIEW),
                "create experiment",
            )
        except MlflowException:
            existing = retried(lambda: mlflow_client.get_experiment_by_name(name), "experiment")
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' was deleted (id {existing.experiment_id}, in the trash): "
            f"restore it with `mlflow experiments restore --experiment-id "
            f"{existing.experiment_id}` or give the experiment another name"
        )
    if existing.tags.get(EXPERIMENT_KIND) is None:  # made before pwf set it, or by hand
        retried(
            lambda: mlflow_client.set_experiment_tag(
                existing.experiment_id, EXPERIMENT_KIND, TRAINING_VIEW[EXPERIMENT_KIND]
            ),
            "tag experiment",
        )
    return existing.experiment_id


def note(description: str, links: Mapping[str, str | None]) -> str:
    """A run's description as MLflow renders it (markdown): the text, then one clickable
    link per named page (``None`` leaves a page out)."""
    shown = [f"[{label}]({url})" for label, url in links.items() if url]
    return description + ("\n\n" + " · ".join(shown) if shown else "")


def standard_tags(source: str, description: str | None = None) -> dict[str, str]:
    """MLflow's own fields: source, commit, user and the run's description."""
    tags = {
        "mlflow.source.name": source,
        "mlflow.source.type": "PROJECT",
        "mlflow.source.git.commit": git_commit(),
        "mlflow.user": getpass.getuser(),
    }
    if description:
        tags["mlflow.note.content"] = description
    return tags


class RunTracker:
    """Logs one MLflow run: params, tags, metrics with steps, artifacts, final status.

    Args:
        run_id: The run.
        experiment_id: Its MLflow experiment.
        mlflow_client: Client bound to the tracking URI.
    """

    def __init__(self, run_id: str, experiment_id: str, mlflow_client: MlflowClient) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = mlflow_client

    @classmethod
    def open(
        cls,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> RunTracker:
        """Reopen ``resume_run_id`` when it exists in the store, else create a new run.

        A reopened run gets the current name and tags (a retried sweep trial has a new number).
        """
        mlflow_client = client()
        eid = experiment_id(mlflow_client, experiment)
        all_tags = {"mlflow.runName": run_name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id:
            run = find_run(experiment, resume_run_id)
            if run is not None and run.info.experiment_id == eid:
                tracker = cls(resume_run_id, eid, mlflow_client)
                tracker.rename(run_name, status="RUNNING")
                tracker.set_tags(all_tags)
                return tracker
        run = retried(
            lambda: mlflow_client.create_run(eid, tags=all_tags, run_name=run_name), "create run"
        )
        return cls(run.info.run_id, eid, mlflow_client)

    @classmethod
    def reopened(cls, experiment: str, run_id: str) -> RunTracker:
        """A tracker for an existing run, its status left as it is."""
        mlflow_client = client()
        return cls(run_id, experiment_id(mlflow_client, experiment), mlflow_client)

    @property
    def url(self) -> str:
        return run_url(self.experiment_id, self.run_id, self.client.tracking_uri)

    def _call(self, what: str, method, *args, **kwargs):
        return retried(lambda: method(*args, **kwargs), what)

    def rename(self, run_name: str, status: str | None = None) -> None:
        """Give the run ``run_name`` (and ``status``): a retried trial has a new number."""
        self._call("update run", self.client.update_run, self.run_id, status=status, name=run_name)

    def logged_params(self) -> dict[str, str]:
        return self._call("read run", self.client.get_run, self.run_id).data.params

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters not yet logged (MLflow params are write-once)."""
        present = self.logged_params()
        entries = [Param(k, str(v)) for k, v in params.items() if k not in present]
        for start in range(0, len(entries), MAX_BATCH):
            batch = entries[start : start + MAX_BATCH]
            self._call("log params", self.client.log_batch, self.run_id, params=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set tags", self.client.log_batch, self.run_id, tags=entries)

    def logged_steps(self, key: str) -> set[int]:
        history = self._call("read metrics", self.client.get_metric_history, self.run_id, key)
        return {m.step for m in history}

    def logged_metrics(self) -> dict[str, float]:
        """The latest value of every metric of the run."""
        return dict(self._call("read run", self.client.get_run, self.run_id).data.metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_series([(key, value, step) for key, value in metrics.items()])

    def log_series(self, points: list[tuple[str, float, int]]) -> None:
        """Log ``(key, value, step)`` points in as few calls as MLflow allows (curves).

        A batch is retried whole after an outage; MLflow's store drops a metric point equal
        to one it holds (same key, step, timestamp and value), so a batch that was written
        before the connection broke is not logged twice.
        """
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value, step in points]
        for start in range(0, len(entries), MAX_BATCH):
            batch = entries[start : start + MAX_BATCH]
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_image(self, path: Path, key: str) -> None:
        """A PNG as an MLflow image under ``key`` (shown side by side in the compare view)."""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self._call("log image", self.client.log_image, self.run_id, pixels, key=key, step=0)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def status(self) -> str:
        return self._call("read run", self.client.get_run, self.run_id).info.status

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` (what was logged stays).

        Args:
            timeout_s: How long to wait out an outage (default: the process's budget).
        """
        retry_transient(
            lambda: self.client.set_terminated(self.run_id, status=status),
            f"MLflow at {shown_uri()} (end run)",
            TrackingUnavailable,
            timeout_s,
        )


@contextmanager
def tracked_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[RunTracker]:
    """Open (or reopen) a run and close it with the status the block earned.

    FINISHED when the block returns, KILLED on Ctrl-C or SIGTERM, FAILED on any other exception
    (which is re-raised). An interrupted command must end within seconds, so its status gets a
    short wait; when the tracking server itself stayed away, the run is left RUNNING and the
    rerun that continues it closes it.
    """
    tracker = RunTracker.open(experiment, run_name, tags, parent_run_id, resume_run_id)
    try:
        yield tracker
    except TrackingUnavailable:
        raise
    except BaseException as err:
        if is_interrupt(err):
            with contextlib.suppress(TrackingUnavailable):
                tracker.finish("KILLED", timeout_s=INTERRUPTED_STATUS_WAIT_S)
        else:
            tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def find_run(experiment: str, run_id: str) -> Any | None:
    """The run ``run_id`` if it is in the store and not deleted.

    Only "no such run" means no run: an outage is waited out (and raises
    :class:`~pwf_flows.infra.TrackingUnavailable` past its budget), so a store that is down
    for a moment never makes pwf start a second run.
    """
    mlflow_client = client()
    try:
        run = retried(lambda: mlflow_client.get_run(run_id), "read run")
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run
