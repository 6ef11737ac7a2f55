"""Where a person opens what pwf records: one set of addresses for every link it stores or prints.

A local run (MLflow in a SQLite file, Prefect's temporary server, the study in ``optuna.db``)
is browsed through ``pwf ui``, which serves the three stores on 127.0.0.1 at fixed ports: the
defaults below, or ``PWF_UI_MLFLOW_PORT``, ``PWF_UI_PREFECT_PORT`` and ``PWF_UI_OPTUNA_PORT``
(``pwf ui`` reads the same variables). Every link pwf writes for such a run points there, so it
works after the command that wrote it has ended. On a server deployment
(``MLFLOW_TRACKING_URI``/``PREFECT_API_URL`` naming servers) links use the servers' own URLs.

MLflow 3 opens pages in the view the browser last chose, GenAI by default; every MLflow link
carries ``workflowType=machine_learning``, which the UI reads before that setting (its
``WorkflowTypeProvider``), so a run, an experiment or a comparison opens in the model-training
view in any browser profile.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from pwf_core.errors import ConfigError

HOST = "127.0.0.1"
TRAINING_VIEW = "workflowType=machine_learning"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class LocalUI:
    """One of the UIs ``pwf ui`` serves: its name, the variable that moves it, its port.

    Args:
        name: What the user reads (``MLflow``).
        env: The environment variable holding its port.
        default_port: The port without that variable.
        flag: ``pwf ui``'s option for the port.
    """

    name: str
    env: str
    default_port: int
    flag: str

    def port(self) -> int:
        """The port: ``env`` when set (a number from 1 to 65535), else the default.

        Raises:
            ConfigError: naming the variable, when it holds no port number.
        """
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default_port
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ConfigError(f"{self.env}={text!r}: a port is a number from 1 to 65535")
        return int(text)

    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port()}"


MLFLOW_UI = LocalUI("MLflow", "PWF_UI_MLFLOW_PORT", 5000, "--mlflow-port")
PREFECT_UI = LocalUI("Prefect", "PWF_UI_PREFECT_PORT", 4200, "--prefect-port")
OPTUNA_UI = LocalUI("optuna-dashboard", "PWF_UI_OPTUNA_PORT", 8080, "--optuna-port")
LOCAL_UIS = (MLFLOW_UI, PREFECT_UI, OPTUNA_UI)


def is_server_uri(uri: str | None) -> bool:
    """Whether ``uri`` names a server (HTTP) rather than a store pwf opens itself."""
    return bool(uri) and uri.startswith(("http://", "https://"))


def mlflow_ui(tracking_uri: str | None = None) -> str:
    """The MLflow UI for ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``): the server
    itself (without credentials), else where ``pwf ui`` serves the local store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not is_server_uri(uri):
        return MLFLOW_UI.url()
    scheme, _, rest = uri.rstrip("/").partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"  # no credentials in a link


def _mlflow_page(route: str, tracking_uri: str | None, query: str = "") -> str:
    joined = f"{query}&{TRAINING_VIEW}" if query else TRAINING_VIEW
    return f"{mlflow_ui(tracking_uri)}/#/{route}?{joined}"


def run_url(experiment_id: str, run_id: str, tracking_uri: str | None = None) -> str:
    """The run's page, in the model-training view."""
    return _mlflow_page(f"experiments/{experiment_id}/runs/{run_id}", tracking_uri)


def artifact_url(
    experiment_id: str, run_id: str, path: str, tracking_uri: str | None = None
) -> str:
    """The run's artifact ``path`` (e.g. ``report/report.html``) shown in MLflow's viewer."""
    route = f"experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"
    return _mlflow_page(route, tracking_uri)


def experiment_url(experiment_id: str, tracking_uri: str | None = None) -> str:
    """The experiment's runs table, in the model-training view."""
    return _mlflow_page(f"experiments/{experiment_id}", tracking_uri)


def compare_url(
    experiment_ids: Sequence[str], run_ids: Sequence[str], tracking_uri: str | None = None
) -> str:
    """MLflow's comparison of ``run_ids`` (params, metrics and images side by side)."""
    query = (
        f"runs={quote(json.dumps(list(run_ids), separators=(',', ':')))}"
        f"&experiments={quote(json.dumps(sorted(set(experiment_ids)), separators=(',', ':')))}"
    )
    return _mlflow_page("compare-runs", tracking_uri, query)


def prefect_ui() -> str | None:
    """The Prefect UI of the current run: what Prefect's settings say (``PREFECT_UI_URL``,
    else derived from ``PREFECT_API_URL``), ``None`` outside Prefect's reach."""
    from prefect.settings import PREFECT_UI_URL

    value = PREFECT_UI_URL.value()
    return value.rstrip("/") if value else None


def served_prefect_url(stored: str | None) -> str | None:
    """A stored Prefect link as it opens now.

    pwf before ``pwf ui`` stored the temporary server's address (127.0.0.1 at a random port,
    gone once the command ended); the page's path is still valid under ``pwf ui``'s Prefect
    UI, so without ``PREFECT_API_URL`` (local runs) such a link is moved there. A link to
    another host, or any link while ``PREFECT_API_URL`` names a server, is kept as it is.

    Args:
        stored: A run's ``prefect.flow_run_url`` tag, if it has one.
    """
    if not stored:
        return None
    local, parts = urlsplit(PREFECT_UI.url()), urlsplit(stored)
    if (
        os.environ.get("PREFECT_API_URL")
        or parts.hostname not in _LOOPBACK
        or parts.port == local.port
    ):
        return stored
    return urlunsplit((local.scheme, local.netloc, parts.path, parts.query, parts.fragment))


def optuna_study_url(study_id: int) -> str:
    """The study's page in the optuna-dashboard ``pwf ui`` serves."""
    return f"{OPTUNA_UI.url()}/dashboard/studies/{study_id}"


def optuna_trial_url(study_id: int, number: int) -> str:
    """Trial ``number``'s page in the optuna-dashboard ``pwf ui`` serves."""
    return f"{optuna_study_url(study_id)}/trials?numbers={number}"


def browse_hint(tracking_uri: str) -> str:
    """How to browse what a command recorded: the server's UI, or ``pwf ui``."""
    if is_server_uri(tracking_uri):
        return f"open {mlflow_ui(tracking_uri)}"
    served = ", ".join(f"{ui.name} {ui.url()}" for ui in LOCAL_UIS)
    return f"pwf ui (serves the links above: {served})"
