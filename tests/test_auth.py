"""No anonymous access: a Prefect server with an API auth string and an MLflow server with its
basic-auth app (sqlite stores under ``tmp_path``, free ports on 127.0.0.1), as docker/compose.yaml
runs them. Requests without credentials get 401, requests with them succeed, and a sweep runs
end to end with the credentials only in the environment of the workers and the CLI: its
flow-run parameters, deployments, Prefect logs, MLflow params and tags and the processes' logs
never hold a secret, and its MLflow runs are readable only with credentials.
"""

from __future__ import annotations

import base64
import configparser
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests._dummies.services import (
    Services,
    free_port,
    mlflow_server_argv,
    prefect_server_argv,
    request,
)
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
# Variables a developer's shell may carry that would authenticate the "anonymous" side.
CREDENTIAL_VARIABLES = (
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "PREFECT_SERVER_API_AUTH_STRING",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
# One trial of a few seconds (its driver and the trial each sign in to both servers); the
# sweep's own schedules are shortened to two rounds (a space override merges into the file's
# choices).
OVERRIDES = {
    "study.n_trials": 1,
    "overrides": {"pretrain.epochs": 3, "train.epochs": 0.25, "eval.mc_samples": 0},
    "space": {
        "compression.b": {"int": [4, 6]},
        "compression.schedule": {"choices": {"paper": [0.5, 1.0], "five": [0.4, 1.0]}},
    },
}
pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Credentials:
    """Fresh random secrets for one test run, so none is ever written in the repository."""

    def __init__(self) -> None:
        self.prefect_password = secrets.token_urlsafe(18)
        self.prefect_auth = f"pwf:{self.prefect_password}"
        self.mlflow_user = "admin"
        self.mlflow_password = secrets.token_urlsafe(18)
        self.mlflow_secret_key = secrets.token_urlsafe(24)

    def leaked(self) -> list[str]:
        """Every form a secret could leak in: plain, and as the Basic header carries it."""
        basic = [
            base64.b64encode(pair.encode()).decode()
            for pair in (self.prefect_auth, f"{self.mlflow_user}:{self.mlflow_password}")
        ]
        return [self.prefect_password, self.mlflow_password, self.mlflow_secret_key, *basic]

    def assert_absent(self, text: str, where: str) -> None:
        """Fail, naming ``where`` but not the secret, when ``text`` holds any secret."""
        found = [secret for secret in self.leaked() if secret in text]
        assert not found, f"a secret appears in {where}"


def basic(user_password: str) -> str:
    """The Authorization header value of HTTP basic auth for ``user:password``."""
    return "Basic " + base64.b64encode(user_password.encode()).decode()


def http(
    url: str, body: dict | None = None, authorization: str | None = None, host: str | None = None
) -> tuple[int, Any]:
    """Status and body (JSON when it parses) of a GET (``body`` None) or POST (:func:`request`).

    ``host`` replaces the Host header (the name a client used to reach the server).
    """
    headers = {}
    if authorization:
        headers["Authorization"] = authorization
    if host:
        headers["Host"] = host
    return request(url, body, headers)


def mlflow_auth_config(workdir: Path) -> Path:
    """docker/mlflow-auth.ini with its auth database moved from the volume to ``workdir``."""
    config = configparser.ConfigParser()
    config.read(ROOT / "docker" / "mlflow-auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{workdir / 'basic_auth.db'}"
    path = workdir / "mlflow-auth.ini"
    with path.open("w") as handle:
        config.write(handle)
    return path


def compose_allowed_hosts() -> str:
    """The Host names compose.yaml's MLflow server accepts, PWF_PUBLIC_HOST at its default."""
    hosts = COMPOSE["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    return hosts.replace("${PWF_PUBLIC_HOST:-localhost}", "localhost")


@pytest.mark.timeout(300)
def test_servers_refuse_anonymous_requests_and_a_sweep_runs_with_credentials(tmp_path):
    from prefect.client.orchestration import SyncPrefectClient

    creds = Credentials()
    ports = {"prefect": free_port(), "mlflow": free_port()}
    prefect_api = f"http://127.0.0.1:{ports['prefect']}/api"
    mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
    # Clients and workers: the server addresses and the credentials, from the environment only.
    client_env = {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_API_AUTH_STRING": creds.prefect_auth,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_TRACKING_USERNAME": creds.mlflow_user,
        "MLFLOW_TRACKING_PASSWORD": creds.mlflow_password,
    }
    services = Services(
        tmp_path,
        env={"PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1"},
        unset=CREDENTIAL_VARIABLES,
    )
    try:
        services.start(
            "prefect-server",
            prefect_server_argv(ports["prefect"]),
            PREFECT_SERVER_API_AUTH_STRING=creds.prefect_auth,
        )
        services.start(
            "mlflow-server",
            mlflow_server_argv(
                ports["mlflow"],
                f"sqlite:///{tmp_path / 'mlruns.db'}",
                "--app-name",
                "basic-auth",
                "--serve-artifacts",
                "--artifacts-destination",
                str(tmp_path / "mlartifacts"),
            ),
            MLFLOW_AUTH_CONFIG_PATH=str(mlflow_auth_config(tmp_path)),
            MLFLOW_AUTH_ADMIN_USERNAME=creds.mlflow_user,
            MLFLOW_AUTH_ADMIN_PASSWORD=creds.mlflow_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=creds.mlflow_secret_key,
            MLFLOW_SERVER_ALLOWED_HOSTS=compose_allowed_hosts(),
        )
        # The health endpoints answer without credentials: compose's healthchecks rely on it.
        services.wait_http(f"{prefect_api}/health", "the Prefect server")
        services.wait_http(f"{mlflow_url}/health", "the MLflow server")

        prefect_query = (f"{prefect_api}/work_pools/filter", {})
        mlflow_query = (f"{mlflow_url}/api/2.0/mlflow/experiments/search", {"max_results": 5})
        for url, body in (prefect_query, mlflow_query):
            assert http(url, body)[0] == 401, url
            assert http(url, body, basic("pwf:wrong-password-0000"))[0] == 401, url
            assert http(url, body, basic("admin:wrong-password-0000"))[0] == 401, url
        assert http(*prefect_query, basic(creds.prefect_auth))[0] == 200
        mlflow_admin = basic(f"{creds.mlflow_user}:{creds.mlflow_password}")
        assert http(*mlflow_query, mlflow_admin)[0] == 200
        # One server's credentials open nothing on the other.
        assert http(*prefect_query, mlflow_admin)[0] == 401
        assert http(*mlflow_query, basic(creds.prefect_auth))[0] == 401
        # compose's workers reach MLflow as mlflow:5000; a name not listed is refused first.
        assert http(*mlflow_query, mlflow_admin, host="mlflow:5000")[0] == 200
        assert http(*mlflow_query, host="mlflow:5000")[0] == 401
        assert http(*mlflow_query, mlflow_admin, host="elsewhere.example:5000")[0] == 403

        def cli(argv: list[str], cwd: Path = tmp_path, timeout: float = 120, **env: str) -> str:
            return services.run(argv, cwd, timeout, **client_env, **env)

        # Both pools at once: each CLI call spends seconds importing Prefect.
        def create_pool(name: str) -> str:
            return cli(["prefect", "work-pool", "create", name, "--type", "process"])

        with ThreadPoolExecutor(2) as pools:
            list(pools.map(create_pool, ("gpu", "cpu")))
        services.worker("worker-gpu", "gpu", 1, **client_env)
        services.worker("worker-cpu", "cpu", **client_env)
        deployed = cli(
            ["prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, PWF_PROJECT_DIR=str(ROOT)
        )
        assert "pwf/full-sweep" in deployed and "pwf-experiment/gpu" in deployed

        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        overrides = OVERRIDES | {
            "study.storage": storage,
            "execution.artifacts_dir": str(tmp_path / "artifacts"),
        }
        watched = cli(
            [
                "prefect",
                "deployment",
                "run",
                "pwf/full-sweep",
                "--param",
                f"overrides={json.dumps(overrides)}",
                "--watch",
                "--watch-timeout",
                "200",
            ],
            timeout=230,
        )
        assert "Completed" in watched, watched[-4000:]
        services.check_running()
        study = optuna.load_study(study_name="full-sweep", storage=storage)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1

        # MLflow: the sweep's runs, readable only with credentials, hold no secret.
        experiment_url = f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name"
        found = f"{experiment_url}?experiment_name=full-sweep"
        assert http(found)[0] == 401
        status, experiment = http(found, authorization=mlflow_admin)
        assert status == 200
        search = (
            f"{mlflow_url}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment["experiment"]["experiment_id"]]},
        )
        assert http(*search)[0] == 401
        status, runs = http(*search, mlflow_admin)
        assert status == 200 and len(runs["runs"]) == 2  # the sweep and its trial
        assert all(run["info"]["status"] == "FINISHED" for run in runs["runs"])
        creds.assert_absent(json.dumps(runs), "MLflow params, tags or metrics")
        artifacts = f"{mlflow_url}/api/2.0/mlflow/artifacts/list?run_id="
        run_id = runs["runs"][0]["info"]["run_id"]
        assert http(artifacts + run_id)[0] == 401
        assert http(artifacts + run_id, authorization=mlflow_admin)[0] == 200

        # Prefect: flow runs, deployments and logs, read through the client with credentials.
        with SyncPrefectClient(prefect_api, auth_string=creds.prefect_auth) as client:
            flow_runs = client.read_flow_runs()
            deployments = client.read_deployments()
            prefect_logs = client.read_logs()
        assert len(flow_runs) == 2  # the driver and its trial
        assert all(run.state_type.value == "COMPLETED" for run in flow_runs)
        for run in flow_runs:
            creds.assert_absent(json.dumps(run.parameters, default=str), "flow-run parameters")
            creds.assert_absent(json.dumps(run.job_variables, default=str), "job variables")
        for deployment in deployments:
            creds.assert_absent(deployment.model_dump_json(), f"deployment {deployment.name}")
        assert prefect_logs
        creds.assert_absent("\n".join(log.message for log in prefect_logs), "Prefect logs")
        creds.assert_absent(watched + deployed, "the CLI's output")
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
        creds.assert_absent(logs, "the servers' and workers' logs")
    finally:
        services.stop_all()
