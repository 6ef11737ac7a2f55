"""Static checks of the cluster files (no Docker engine runs in CI): the compose services agree
with prefect.yaml's pools, the image build uses files that exist, and the databases the
services name are created."""

import re

import yaml

from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
PREFECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_services_cover_the_cluster():
    services = COMPOSE["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker-cpu", "worker-gpu-0", "setup"} <= set(
        services
    )
    gpu = services["worker-gpu-0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_worker_pools_match_the_deployments():
    pools = {d["work_pool"]["name"] for d in PREFECT["deployments"]}
    started = {
        re.search(r"--pool (\S+)", s["command"]).group(1)
        for name, s in COMPOSE["services"].items()
        if name.startswith("worker")
    }
    assert started == pools == {"cpu", "gpu"}
    setup = COMPOSE["services"]["setup"]["command"]
    assert all(f"work-pool create {pool}" in setup for pool in pools)
    assert "deploy --all" in setup


def test_image_and_databases():
    build = COMPOSE["x-pwf"]["build"]
    assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve().is_file()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY (\S+) (\S+) \./$", dockerfile, flags=re.M)[0]:
        assert (ROOT / copied).is_file()
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    named = set(re.findall(r"postgres:5432/(\w+)", (ROOT / "docker" / "compose.yaml").read_text()))
    assert named == {"prefect", "mlflow", "optuna"}
    assert all(f"CREATE DATABASE {db}" in init for db in named - {"prefect"})
