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
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.test_server_deployment import free_port

VENV_BIN = Path(sys.executable).parent
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
# As in tests/test_server_deployment.py, two trials of a few seconds each; the sweep's own
# schedules are shortened to two rounds (a space override merges into the file's choices).
OVERRIDES = {
    "study.n_trials": 2,
    "execution.max_parallel": 2,
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
    """Status and body (JSON when it parses) of a GET (``body`` None) or POST.

    ``host`` replaces the Host header (the name a client used to reach the server).
    """
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    if host:
        headers["Host"] = host
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, None
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:  # MLflow's /health says OK
        return status, text


class Processes:
    """Background processes, each in its own session, stopped the documented way."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, tuple[subprocess.Popen, bool]] = {}
        self.log_files: list[Any] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], worker: bool = False) -> None:
        """Start ``argv`` in a session of its own, logging to ``<name>.log`` in the workdir."""
        log = (self.workdir / f"{name}.log").open("w")
        self.log_files.append(log)
        self.started[name] = (
            subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
            worker,
        )

    def assert_running(self) -> None:
        for name, (process, _) in self.started.items():
            if process.poll() is not None:
                log = (self.workdir / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"{name} exited with {process.returncode}:\n{log}")

    def wait_healthy(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if http(url)[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            self.assert_running()
            assert time.monotonic() < deadline, f"{url} did not come up"
            time.sleep(0.5)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.workdir.glob("*.log"))

    def stop(self) -> None:
        """Workers: SIGINT twice (they ignore one SIGTERM); servers: SIGTERM; then the rest.

        Flow runs a worker started run in sessions of their own, so every descendant is
        collected first and killed at the end if it outlived its parent (the same process: its
        start time is compared, so a PID reused since is left alone).
        """
        descendants = {}
        for process, _ in self.started.values():
            descendants |= _tree(process.pid)
        workers = [p for p, worker in self.started.values() if worker and p.poll() is None]
        for _ in range(2):
            for process in workers:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
            time.sleep(1)
        for process, worker in self.started.values():
            if not worker and process.poll() is None:
                process.terminate()
        for process, _ in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            _kill_group(process.pid)
            process.wait()
        for pid, started in descendants.items():
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for log in self.log_files:
            log.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _tree(root: int) -> dict[int, str]:
    """``root``'s running descendants (Linux /proc) and their start times."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


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
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    base |= {
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    # Clients and workers: the server addresses and the credentials, from the environment only.
    client_env = base | {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_API_AUTH_STRING": creds.prefect_auth,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_TRACKING_USERNAME": creds.mlflow_user,
        "MLFLOW_TRACKING_PASSWORD": creds.mlflow_password,
    }
    processes = Processes(tmp_path)
    try:
        processes.start(
            "prefect-server",
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])],
            base | {"PREFECT_SERVER_API_AUTH_STRING": creds.prefect_auth},
        )
        processes.start(
            "mlflow-server",
            [
                "mlflow",
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlruns.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(tmp_path / "mlartifacts"),
            ],
            base
            | {
                "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(tmp_path)),
                "MLFLOW_AUTH_ADMIN_USERNAME": creds.mlflow_user,
                "MLFLOW_AUTH_ADMIN_PASSWORD": creds.mlflow_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.mlflow_secret_key,
                "MLFLOW_SERVER_ALLOWED_HOSTS": compose_allowed_hosts(),
            },
        )
        # The health endpoints answer without credentials: compose's healthchecks rely on it.
        processes.wait_healthy(f"{prefect_api}/health")
        processes.wait_healthy(f"{mlflow_url}/health")

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
            done = subprocess.run(
                argv,
                cwd=cwd,
                env=client_env | env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{argv}\n{output[-4000:]}"
            return output

        # Both pools at once: each CLI call spends seconds importing Prefect.
        pools = [
            subprocess.Popen(
                ["prefect", "work-pool", "create", pool, "--type", "process"],
                cwd=tmp_path,
                env=client_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for pool in ("gpu", "cpu")
        ]
        for pool in pools:
            output = pool.communicate(timeout=120)[0]
            assert pool.returncode == 0, output[-4000:]
        processes.start(
            "worker-gpu",
            ["prefect", "worker", "start", "--pool", "gpu", "--limit", "1"],
            client_env,
            worker=True,
        )
        processes.start(
            "worker-cpu", ["prefect", "worker", "start", "--pool", "cpu"], client_env, worker=True
        )
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
        processes.assert_running()
        study = optuna.load_study(study_name="full-sweep", storage=storage)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2

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
        assert status == 200 and len(runs["runs"]) == 3  # the sweep and its two trials
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
        assert len(flow_runs) == 3  # the driver and its two trials
        assert all(run.state_type.value == "COMPLETED" for run in flow_runs)
        for run in flow_runs:
            creds.assert_absent(json.dumps(run.parameters, default=str), "flow-run parameters")
            creds.assert_absent(json.dumps(run.job_variables, default=str), "job variables")
        for deployment in deployments:
            creds.assert_absent(deployment.model_dump_json(), f"deployment {deployment.name}")
        assert prefect_logs
        creds.assert_absent("\n".join(log.message for log in prefect_logs), "Prefect logs")
        creds.assert_absent(watched + deployed, "the CLI's output")
        creds.assert_absent(processes.logs(), "the servers' and workers' logs")
    finally:
        processes.stop()
