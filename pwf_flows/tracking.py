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
import urllib.parse
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

from pwf_core._files import file_lock, sqlite_file_problem
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


_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_OTHER_SCHEMES = ("databricks", "databricks-uc", "uc")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow cannot record into ``uri`` (words that follow the URI in a message), or
    ``None`` when it can try: a malformed URL, a SQLite file that is no database or sits in no
    folder, MLflow's retired file store."""
    scheme, sep, _ = uri.partition("://")
    scheme = scheme.lower()
    if not sep and uri.startswith("databricks"):
        return None
    if scheme in ("http", "https"):
        try:
            parts = urllib.parse.urlsplit(uri)
            port = parts.port  # raises for a port that is not a number
        except ValueError as err:
            return f"is not a valid URL ({err})"
        if not parts.hostname:
            return "names no host"
        return None if port is None or port > 0 else f"has port {port}, which no server uses"
    if scheme.split("+")[0] in _DATABASE_SCHEMES:
        try:
            parsed = make_url(uri)
        except Exception as err:  # sqlalchemy raises ArgumentError, ValueError, ...
            return f"is not a database URL ({err})"
        if parsed.get_backend_name() == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                return "names no database file (sqlite:////absolute/path/mlruns.db)"
            problem = sqlite_file_problem(parsed.database)
            return None if problem is None else f"names an unusable database file: {problem}"
        return None
    if scheme in _OTHER_SCHEMES:
        return None
    return (
        "is not a server (http://host:port) or a database (sqlite:///path/mlruns.db, "
        "postgresql://...) that pwf records into"
    )


def check_tracking_uri(uri: str | None = None) -> str:
    """``uri`` (default: the current tracking URI), refused with one line when MLflow cannot
    record into it.

    Raises:
        TrackingError: naming the URI (password masked) and what is wrong with it.
    """
    uri = uri if uri is not None else tracking_uri()
    problem = tracking_uri_problem(uri)
    if problem is not None:
        raise TrackingError(f"MLflow tracking URI '{shown_uri(uri)}' {problem}")
    return uri


def retried(call: Callable[[], T], what: str = "call") -> T:
    """``call()`` with outages of the tracking store waited out (see :mod:`pwf_flows.infra`).

    Raises:
        TrackingUnavailable: once an outage outlasted the process's budget.
    """
    return retry_transient(call, f"MLflow at {shown_uri()}", TrackingUnavailable, doing=what)


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

    Logging is idempotent across resumes: whatever path a run resumes by (a step done again
    after a damaged checkpoint, the final evaluation after a lost folder), a metric already
    holding a value at a step is not given a second one, a param is written once, and an image
    is logged once per key and step. What legitimately changes between sessions (a continued
    sweep's totals) goes through :meth:`log_latest`, at a step of its own each time.

    Args:
        run_id: The run.
        experiment_id: Its MLflow experiment.
        mlflow_client: Client bound to the tracking URI.
        new: The run was just created, so nothing is logged in it yet.
    """

    def __init__(
        self, run_id: str, experiment_id: str, mlflow_client: MlflowClient, new: bool = False
    ) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = mlflow_client
        self._logged: dict[str, dict[int, float]] | None = {} if new else None

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
        return cls(run.info.run_id, eid, mlflow_client, new=True)

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

    def _points(self) -> dict[str, dict[int, float]]:
        """Every metric point of the run, ``{key: {step: value}}``, read once per tracker."""
        if self._logged is None:
            keys = list(self.logged_metrics())
            self._logged = {
                key: {
                    m.step: m.value
                    for m in self._call(
                        "read metrics", self.client.get_metric_history, self.run_id, key
                    )
                }
                for key in keys
            }
        return self._logged

    def logged_steps(self, key: str) -> set[int]:
        return set(self._points().get(key, {}))

    def logged_metrics(self) -> dict[str, float]:
        """The latest value of every metric of the run."""
        return dict(self._call("read run", self.client.get_run, self.run_id).data.metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_series([(key, value, step) for key, value in metrics.items()])

    def log_latest(self, metrics: Mapping[str, float]) -> None:
        """Log values that change between sessions (a continued sweep's totals): each at the
        step after the key's last one, unless it equals the value logged last. The keys'
        histories are read afresh (another process, a second sweep driver, may have logged
        since); a caller that shares the run serialises these calls."""
        logged = self._points()
        for key in metrics:
            history = self._call("read metrics", self.client.get_metric_history, self.run_id, key)
            logged[key] = {m.step: m.value for m in history}
        points = []
        for key, value in metrics.items():
            history = logged[key]
            if history and history[max(history)] == float(value):
                continue
            points.append((key, value, max(history) + 1 if history else 0))
        self.log_series(points)

    def log_series(self, points: list[tuple[str, float, int]]) -> None:
        """Log ``(key, value, step)`` points in as few calls as MLflow allows (curves).

        A point whose key already has a value at its step (logged before a crash, or by an
        earlier session of a resumed run) is left out. A batch is retried whole after an
        outage; MLflow's store drops a metric point equal to one it holds (same key, step,
        timestamp and value), so a batch that was written before the connection broke is not
        logged twice.
        """
        logged = self._points()
        now = int(time.time() * 1000)
        entries = []
        for key, value, step in points:
            steps = logged.setdefault(key, {})
            if step not in steps:
                steps[step] = float(value)
                entries.append(Metric(key, float(value), now, step))
        for start in range(0, len(entries), MAX_BATCH):
            batch = entries[start : start + MAX_BATCH]
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_image(self, path: Path, key: str) -> None:
        """A PNG as an MLflow image under ``key`` (shown side by side in the compare view),
        once: a resumed run that logged it already leaves it."""
        prefix = f"images/{key.replace('/', '~')}+step+0+"
        listed = self._call("list artifacts", self.client.list_artifacts, self.run_id, "images")
        if any(item.path.startswith(prefix) for item in listed):
            return
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
            f"MLflow at {shown_uri()}",
            TrackingUnavailable,
            timeout_s,
            doing="end run",
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
