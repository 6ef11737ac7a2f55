"""The cluster files, checked without a Docker engine (none runs in CI): the compose files
against the Compose specification, their security rules, their agreement with prefect.yaml, and
the Dockerfile's install steps resolved in a fresh virtual environment."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu-host.yaml"]
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
PREFECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
VENV_BIN = Path(sys.executable).parent


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
    # A password key's value is always ${...}, never a literal.
    assert not re.search(r"^\s*\w*PASSWORD:\s+(?!\$\{)\S", text, re.M)
    for url in re.findall(r"\w+://[^\s\"']+", text):
        assert not re.search(r"://[^:/@]+:[^$@/][^@]*@", url), url  # user:secret@ literal


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
    hosts = [COMPOSE, yaml.safe_load((DOCKER / "compose.gpu-host.yaml").read_text())]
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
    for copied in re.findall(r"^COPY (\S+) (\S+) \./$", dockerfile, flags=re.M)[0]:
        assert (ROOT / copied).is_file()
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
    """The Dockerfile's RUN pip install steps, as a dry run in the same layout and a new venv."""
    dockerfile = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [
        shlex.split(command.strip())
        for line in dockerfile.splitlines()
        if line.startswith("RUN")
        for command in line.removeprefix("RUN").split("&&")
        if command.strip().startswith("pip install")
    ]
    assert installs, "the Dockerfile installs nothing with pip"
    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (app / name).write_text((ROOT / name).read_text())
    for package in ("pwf_core", "pwf_flows"):
        (app / package).mkdir()
        (app / package / "__init__.py").touch()
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = str(tmp_path / "venv" / "bin" / "pip")
    for argv in installs:
        done = subprocess.run(
            [pip, *argv[1:], "--dry-run", "--quiet"],
            cwd=app,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert done.returncode == 0, f"{argv}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
