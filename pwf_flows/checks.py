"""What a ``pwf`` command checks before it starts anything: the artifacts folder, that the
servers answer, the study database, the disk, that nobody else computes the experiment.

Each failure is one error the command turns into one ``pwf:`` line and its exit code (see
:mod:`pwf_flows.infra`); nothing is written or tracked before they all pass.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import sqlalchemy
from sqlalchemy.pool import NullPool

from pwf_core.checkpoint import checkpoint_size
from pwf_core.config import ExperimentConfig
from pwf_core.data import load_dataset
from pwf_core.errors import ConfigError
from pwf_core.pretrain import model_spec
from pwf_core.registry import create_method
from pwf_flows.artifacts import ExperimentFiles, disk_plan, human_bytes
from pwf_flows.infra import (
    START_TIMEOUT_S,
    DiskFull,
    PrefectUnavailable,
    StudyStorageUnavailable,
    TrackingUnavailable,
    retry_transient,
    wait_for_http,
)
from pwf_flows.links import LOCAL_UIS
from pwf_flows.run_lock import ExperimentBusy, owner_of
from pwf_flows.sweep.spec import CONNECT_TIMEOUT_S, connect_args, masked_url


def check_artifacts_dir(path: str) -> str:
    """Raise :class:`ConfigError` unless ``path`` is (or can become) a writable folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--artifacts: '{folder}' is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--artifacts: cannot create or write '{folder}' ({existing})")
    return path


def check_tracking_uri() -> None:
    """The MLflow tracking URI must be one MLflow can record into, and the ports of ``pwf ui``
    (which every link to a local run names) port numbers (exit 2 otherwise)."""
    from pwf_flows.tracking import check_tracking_uri as check  # MLflow: once the input is valid

    for ui in LOCAL_UIS:
        ui.port()
    check()


def check_tracking_experiment(experiment: str) -> None:
    """Fail early when MLflow cannot take runs for ``experiment`` (it was deleted)."""
    from pwf_flows.tracking import client, experiment_id

    existing = client().get_experiment_by_name(experiment)
    if existing is not None and existing.lifecycle_stage == "deleted":
        experiment_id(client(), experiment)  # raises the explanation


def _without_credentials(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its ``user:password@`` and the Basic header that carries them instead
    (urllib takes the credentials for part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    secret = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    header = {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), header


def _check_tracking_server(uri: str) -> None:
    from pwf_flows.tracking import shown_uri

    url, headers = _without_credentials(uri.rstrip("/"))
    what = f"the MLflow tracking server {shown_uri(uri)}"
    wait_for_http(f"{url}/health", what, TrackingUnavailable, headers=headers)


def _check_prefect(url: str) -> None:
    headers = {}
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    plain, _ = _without_credentials(url.rstrip("/"))
    wait_for_http(
        f"{plain}/health", f"the Prefect API {plain}", PrefectUnavailable, headers=headers
    )


def check_storage(url: str) -> None:
    """The study database must answer within :data:`START_TIMEOUT_S` (exit 5, naming it with
    the password masked), also one that accepts a connection and then says nothing: each
    attempt is bounded by what is left of the budget."""
    if url.startswith("sqlite"):
        return  # a file: nothing to reach
    deadline = time.monotonic() + START_TIMEOUT_S

    def connect() -> None:
        left = max(1.0, min(CONNECT_TIMEOUT_S, deadline - time.monotonic()))
        engine = sqlalchemy.create_engine(
            url, poolclass=NullPool, connect_args=connect_args(url, left)
        )
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()

    retry_transient(
        connect,
        f"the study database {masked_url(url)}",
        StudyStorageUnavailable,
        START_TIMEOUT_S - 1.0,  # the last attempt's own timeout fits inside the budget
        quiet=True,
    )


class ServerChecks:
    """The servers a command needs, checked at once and in the background while the command
    validates its input, so that a silent one is reported within :data:`START_TIMEOUT_S` of
    the start, not after every other check took its turn.

    Args:
        storage: The study database's URL (a sweep), checked besides the MLflow tracking
            server (an http one) and the Prefect API (when ``PREFECT_API_URL`` is set; pwf
            otherwise starts a temporary server of its own).
    """

    def __init__(self, storage: str | None = None) -> None:
        from pwf_flows.tracking import tracking_uri  # MLflow: once the input is valid

        checks: list[tuple[Callable[[str], None], str]] = []
        uri = tracking_uri()
        if uri.startswith(("http://", "https://")):
            checks.append((_check_tracking_server, uri))
        if os.environ.get("PREFECT_API_URL"):
            checks.append((_check_prefect, os.environ["PREFECT_API_URL"]))
        if storage is not None:
            checks.append((check_storage, storage))
        self._errors: list[BaseException | None] = [None] * len(checks)
        self._threads = [
            threading.Thread(target=self._run, args=(i, check, url), daemon=True)
            for i, (check, url) in enumerate(checks)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int, check: Callable[[str], None], url: str) -> None:
        try:
            check(url)
        except BaseException as err:  # handed to the main thread by wait()
            self._errors[index] = err

    def wait(self) -> None:
        """Wait for every check; raise the first failure (MLflow, then Prefect, then the study
        database: exit 3, 4 or 5)."""
        for thread in self._threads:
            thread.join()
        for error in self._errors:
            if error is not None:
                raise error


def check_disk(config: ExperimentConfig, artifacts: str, runs: int = 1) -> None:
    """Say how much disk the run needs; refuse (exit 6) when the folder has less free."""
    spec = model_spec(config, load_dataset(config.data))
    size = checkpoint_size(spec.build, create_method(config.compression))
    plan = disk_plan(config, size, artifacts, runs)
    needs = f"about {human_bytes(plan.needed)} under {plan.folder} ({plan.detail})"
    if not plan.fits:
        raise DiskFull(
            f"the run needs {needs}, but only {human_bytes(plan.free)} is free there; free "
            "space or choose another folder with --artifacts"
        )
    print(f"disk: needs {needs}; {human_bytes(plan.free)} free", file=sys.stderr)


def check_not_running(config: ExperimentConfig, artifacts: str) -> None:
    """Refuse (exit 2) when another live process computes the same experiment."""
    files = ExperimentFiles.for_config(config, artifacts)
    owner = owner_of(files.lock_folder)
    if owner is not None:
        raise ExperimentBusy(
            f"experiment '{config.name}' ({files.root}) is already running in {owner}; wait "
            "for it to finish, or stop it first (a rerun continues where it stopped)"
        )


def already_finished(config: ExperimentConfig, artifacts: str) -> bool:
    """Whether the experiment is done and its MLflow run intact (then nothing will run)."""
    from pwf_flows.results import finished_result  # MLflow loads only once the input is valid

    return finished_result(config, ExperimentFiles.for_config(config, artifacts)) is not None
