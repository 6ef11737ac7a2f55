"""Offline-safe defaults for Prefect, MLflow and the Hugging Face hub.

Applied when ``flows`` is imported, before Prefect or MLflow are: every value is a default that
the user's environment overrides. Nothing here reaches for the network: analytics and telemetry
are off, the hub is offline, the ephemeral Prefect server gets a generous startup timeout (its
first start migrates a fresh database), and MLflow records into ``mlruns.db`` in the working
directory unless ``MLFLOW_TRACKING_URI`` points elsewhere (e.g. a shared ``mlflow server``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

DEFAULT_MLFLOW_DB = "mlruns.db"


def default_tracking_uri(workdir: Path | None = None) -> str:
    """``sqlite:///<abs path>/mlruns.db`` in ``workdir`` (the current directory by default)."""
    return f"sqlite:///{(workdir or Path.cwd()).resolve() / DEFAULT_MLFLOW_DB}"


def configure_environment(workdir: Path | None = None) -> None:
    """Set the offline defaults (only where the environment has no value yet)."""
    workdir = (workdir or Path.cwd()).resolve()
    defaults = {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per file read by a report
        "MLFLOW_TRACKING_URI": default_tracking_uri(workdir),
        "HF_HUB_OFFLINE": "1",
        "TQDM_MININTERVAL": "1",
        # Outages are waited out by pwf's own retries (pwf_flows.infra, execution.
        # infra_timeout_s); MLflow's client would otherwise sit 255 s in its own backoff on
        # every call before pwf saw the error.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
        # Prefect's client retries with 2, 4, 8, ... s between tries: nine tries span 17
        # minutes, more than the default 10-minute outage budget (Prefect's default five: 1).
        "PREFECT_CLIENT_MAX_RETRIES": "9",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    _quiet_library_retries()


# Loggers that narrate each retry of a call during an outage. pwf waits outages out itself and
# says so once per outage (pwf_flows.infra): their lines every few seconds would bury it.
_RETRY_NARRATORS = ("urllib3.connectionpool", "urllib3.util.retry", "mlflow.utils.request_utils")


def _quiet_library_retries() -> None:
    for name in _RETRY_NARRATORS:
        logging.getLogger(name).setLevel(logging.ERROR)
