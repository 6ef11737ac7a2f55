"""What a ``pwf`` command checks before it starts anything: the artifacts folder, that the
servers answer, the study database, the disk, that nobody else computes the experiment.

Each failure is one error the command turns into one ``pwf:`` line and its exit code (see
:mod:`pwf_flows.infra`); nothing is written or tracked before they all pass.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import sqlalchemy

from pwf_core.checkpoint import checkpoint_size
from pwf_core.config import ExperimentConfig
from pwf_core.data import load_dataset
from pwf_core.errors import ConfigError
from pwf_core.pretrain import model_spec
from pwf_core.registry import create_method
from pwf_flows.artifacts import ExperimentFiles, disk_plan, human_bytes
from pwf_flows.infra import (
    DiskFull,
    PrefectUnavailable,
    StudyStorageUnavailable,
    TrackingUnavailable,
    retry_transient,
    wait_for_http,
)
from pwf_flows.links import LOCAL_UIS
from pwf_flows.run_lock import ExperimentBusy, owner_of
from pwf_flows.sweep.spec import masked_url


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


def check_servers() -> None:
    """The tracking server and the Prefect API (when pwf does not start its own) must answer
    within 30 s: exit 3 or 4, naming the one that does not. The ports of ``pwf ui``, which
    every link to a local run names, must be port numbers (:class:`ConfigError`)."""
    from pwf_flows.tracking import shown_uri, tracking_uri  # MLflow: once the input is valid

    for ui in LOCAL_UIS:
        ui.port()
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        wait_for_http(
            f"{uri.rstrip('/')}/health",
            f"the MLflow tracking server {shown_uri(uri)}",
            TrackingUnavailable,
        )
    check_prefect()


def check_tracking_experiment(experiment: str) -> None:
    """Fail early when MLflow cannot take runs for ``experiment`` (it was deleted)."""
    from pwf_flows.tracking import client, experiment_id

    existing = client().get_experiment_by_name(experiment)
    if existing is not None and existing.lifecycle_stage == "deleted":
        experiment_id(client(), experiment)  # raises the explanation


def check_prefect() -> None:
    """With ``PREFECT_API_URL`` set, the Prefect server must answer within 30 s (exit 4)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return  # pwf starts a temporary server of its own
    headers = {}
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    wait_for_http(
        f"{url.rstrip('/')}/health", f"the Prefect API {url}", PrefectUnavailable, headers=headers
    )


def check_storage(url: str) -> None:
    """The study database must answer within 30 s (exit 5, naming it with the password
    masked)."""
    if url.startswith("sqlite"):
        return  # a file: nothing to reach
    engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
    try:

        def connect() -> None:
            with engine.connect():
                pass

        retry_transient(
            connect, f"the study database {masked_url(url)}", StudyStorageUnavailable, 30.0
        )
    finally:
        engine.dispose()


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
