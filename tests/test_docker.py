"""The cluster files, checked without a Docker engine (none runs in CI): the compose files
against the Compose specification, their security rules (credentials on both servers, from
docker/.env), their agreement with prefect.yaml, and the Dockerfile's install steps resolved in
a fresh virtual environment. tests/test_auth.py runs the same credentials on real servers."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu-host.yaml"]
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
GPU_HOST = yaml.safe_load((DOCKER / "compose.gpu-host.yaml").read_text())
PREFECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
VENV_BIN = Path(sys.executable).parent
ENV_EXAMPLE = dict(
    re.findall(r"^([A-Z_]+)=(.*)$", (DOCKER / ".env.example").read_text(), flags=re.M)
)
# The servers' credentials in docker/.env: required (``${VAR:?...}``), empty in .env.example.
SECRETS = ("PWF_PREFECT_AUTH", "PWF_MLFLOW_PASSWORD", "PWF_MLFLOW_SECRET_KEY")
CLIENT_CREDENTIALS = {
    "PREFECT_API_AUTH_STRING": "PWF_PREFECT_AUTH",
    "MLFLOW_TRACKING_PASSWORD": "PWF_MLFLOW_PASSWORD",
}


def required(value: str, variable: str) -> bool:
    """Whether ``value`` is exactly ``${variable:?...}``: compose refuses to run without it."""
    return re.fullmatch(rf"\$\{{{variable}:\?[^}}]*\}}", str(value)) is not None


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    done = subprocess.run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_password_literal_and_every_variable_documented(path):
    text = path.read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", (DOCKER / ".env.example").read_text(), re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used <= documented, used - documented
    # A password, auth string or secret key is always ${...}, never a literal.
    secret_key = r"\w*(PASSWORD|AUTH_STRING|SECRET_KEY)"
    assert not re.search(rf"^\s*{secret_key}:\s+(?!\$\{{)\S", text, re.M)
    for url in re.findall(r"\w+://[^\s\"']+", text):
        assert not re.search(r"://[^:/@]+:[^$@/][^@]*@", url), url  # user:secret@ literal


def test_env_example_documents_the_credentials_and_holds_none():
    assert set(SECRETS) <= set(ENV_EXAMPLE)
    for name in SECRETS:
        assert ENV_EXAMPLE[name] == "", f"{name} has a value in .env.example"
    assert ENV_EXAMPLE["POSTGRES_PASSWORD"] == "change-me"  # a placeholder, not a secret


def test_both_servers_always_require_credentials_from_docker_env():
    services = COMPOSE["services"]
    prefect = services["prefect-server"]
    assert required(prefect["environment"]["PREFECT_SERVER_API_AUTH_STRING"], "PWF_PREFECT_AUTH")
    mlflow = services["mlflow"]
    assert "--app-name basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert required(env["MLFLOW_AUTH_ADMIN_PASSWORD"], "PWF_MLFLOW_PASSWORD")
    assert required(env["MLFLOW_FLASK_SERVER_SECRET_KEY"], "PWF_MLFLOW_SECRET_KEY")
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == env["MLFLOW_TRACKING_USERNAME"]
    # The auth config is the repository's file, and its user database lives in a volume.
    mounts = {m.split(":")[1]: m.split(":")[0] for m in mlflow["volumes"]}
    assert mounts[env["MLFLOW_AUTH_CONFIG_PATH"]] == "./mlflow-auth.ini"
    auth = configparser.ConfigParser()
    auth.read(DOCKER / "mlflow-auth.ini")
    assert "admin_password" not in auth["mlflow"]
    database = auth["mlflow"]["database_uri"].removeprefix("sqlite:///")
    volume = next(target for target in mounts if database.startswith(target + "/"))
    assert mounts[volume] in COMPOSE["volumes"]
    # The healthchecks use the only endpoints either server answers without credentials.
    assert "/api/health" in " ".join(prefect["healthcheck"]["test"])
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    # Workers reach MLflow as mlflow:5000 and GPU hosts by the public name: both are accepted.
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"mlflow:5000", "${PWF_PUBLIC_HOST:-localhost}:5000"} <= set(hosts)


@pytest.mark.parametrize("compose", [COMPOSE, GPU_HOST], ids=["compose.yaml", "gpu-host"])
def test_every_client_service_sends_the_credentials(compose):
    clients = {
        name: service["environment"]
        for name, service in compose["services"].items()
        if "PREFECT_API_URL" in service.get("environment", {})
    }
    assert {name for name in compose["services"] if name.startswith("worker")} <= set(clients)
    for name, env in clients.items():
        for setting, variable in CLIENT_CREDENTIALS.items():
            assert required(env.get(setting), variable), f"{name}: {setting}"
        assert env["MLFLOW_TRACKING_USERNAME"] == "${PWF_MLFLOW_USERNAME:-admin}", name


def test_mlflow_auth_app_is_installed_with_the_image():
    """The image installs pyproject's dependencies; basic-auth needs MLflow's auth extra."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\s*"mlflow\[auth\][<>=]', pyproject, flags=re.M)


def test_readmes_say_how_to_run_with_credentials():
    readme = (ROOT / "README.md").read_text()
    server = readme.split("## On a server", 1)[1].split("\n## ", 1)[0]
    for phrase in (
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_AUTH_STRING",
        "mlflow server --app-name basic-auth",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "--allowed-hosts",
    ):
        assert phrase in server, phrase
    docker = (DOCKER / "README.md").read_text()
    for phrase in (*SECRETS, "PWF_MLFLOW_USERNAME", "mlflow-auth.ini"):
        assert phrase in docker, phrase


def test_published_ports_listen_on_localhost_unless_opted_in():
    ports = [p for s in COMPOSE["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("${PWF_BIND_ADDRESS:-127.0.0.1}:") for p in ports)


def test_mlflow_serves_artifacts_and_services_cover_the_cluster():
    services = COMPOSE["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker-cpu", "worker-gpu-0", "setup"} <= set(
        services
    )
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    gpu = services["worker-gpu-0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_worker_pools_match_the_deployments():
    pools = {d["work_pool"]["name"] for d in PREFECT["deployments"]}
    hosts = [COMPOSE, GPU_HOST]
    started = {
        re.search(r"--pool (\S+)", service["command"]).group(1)
        for compose in hosts
        for name, service in compose["services"].items()
        if name.startswith("worker")
    }
    assert started == pools == {"cpu", "gpu"}
    setup = COMPOSE["services"]["setup"]["command"]
    assert all(f"work-pool create {pool}" in setup for pool in pools)
    assert "deploy --all" in setup


def test_databases_and_copied_files_exist():
    build = COMPOSE["x-pwf"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY")]
    assert ["."] in copies  # the project itself, after the dependency layer
    for sources in copies:
        for copied in sources:
            assert (ROOT / copied).exists(), copied
    init = (DOCKER / "postgres-init.sql").read_text()
    named = set(re.findall(r"postgres:5432/(\w+)", (DOCKER / "compose.yaml").read_text()))
    assert named == {"prefect", "mlflow"}
    assert all(f"CREATE DATABASE {db}" in init for db in ("mlflow", "optuna"))


def test_readme_documents_the_cluster():
    text = (DOCKER / "README.md").read_text()
    for phrase in (
        "docker compose -f docker/compose.yaml up -d --build",
        "docker compose -f docker/compose.gpu-host.yaml up -d --build",
        "prefect deployment run pwf/full-sweep",
        "prefect deployment schedule create",
        "--type kubernetes",
    ):
        assert phrase in text, phrase


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dockerfile_install_steps_resolve_in_a_fresh_venv(tmp_path):
    """The Dockerfile's COPY and RUN steps in order, in a folder laid out as /app and a new
    venv: its Python commands run, its pip installs as dry runs (apt-get is left out)."""
    dockerfile = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    app = tmp_path / "app"
    app.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    venv = tmp_path / "venv" / "bin"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    installs = 0
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            *sources, _ = shlex.split(line.removeprefix("COPY"))
            names = tracked if sources == ["."] else sources
            for name in names:
                (app / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, app / name)
            continue
        if not line.startswith("RUN"):
            continue
        for command in line.removeprefix("RUN").split("&&"):
            words = shlex.split(command.strip())
            if words[:1] == ["pip"]:
                argv = [str(venv / "pip"), *words[1:], "--dry-run", "--quiet"]
                installs += 1
            elif words[:1] == ["python"]:
                argv = [str(venv / "python"), *words[1:]]
            else:
                continue  # apt-get: the image's system packages
            done = subprocess.run(argv, cwd=app, capture_output=True, text=True, timeout=500)
            assert done.returncode == 0, f"{argv}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert installs >= 2, "the Dockerfile should install the dependencies, then the project"
