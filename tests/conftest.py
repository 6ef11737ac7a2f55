"""Shared fixtures: the digits dataset and a pretrained small CNN, built once per session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from pwf_core.config import ExperimentConfig, load_config
from pwf_core.data import ImageDataset, load_dataset
from pwf_core.pretrain import build_experiment_model, pretrain
from pwf_flows.environment import configure_environment

# Under pytest-xdist each of the two test processes computes on one core (and so do the
# commands it starts): two processes of two threads each on two cores lose more to OpenMP's
# spinning than they gain.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# What the pwf command does when it starts (offline Prefect and MLflow), before any test
# module imports Prefect.
configure_environment()

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"

# The modules that take minutes (servers, clusters, faults injected into real runs), longest
# first: ``make test`` hands whole modules to its two workers in collection order
# (``--no-loadscope-reorder``; xdist would otherwise put the modules of most tests first), so
# these start at once and the short ones fill in around them instead of one of these ending
# the run alone.
LONGEST_MODULES = (
    "test_faults.py",
    "test_slurm.py",
    "test_server_deployment.py",
    "test_cluster.py",
    "test_auth.py",
    "test_report.py",
    "test_ui.py",
    "test_packaging.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run :data:`LONGEST_MODULES` first (each module's tests keep their order)."""
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _nothing_logged_twice(request):
    """After every test, every MLflow store it left in its tmp_path holds each metric once
    per step, whatever resume paths the test took."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is not None:
        from tests._dummies.mlflow_store import assert_stores_logged_once

        assert_stores_logged_once(folder)


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (a temporary database) for the whole test run; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 for the whole test run."""
    from tests._dummies.postgres import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once per test process (copy_empty_store)."""
    from tests._dummies.mlflow_store import create_empty_store

    return create_empty_store(tmp_path_factory.mktemp("empty-mlflow") / "mlruns.db")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_mlflow_db) -> str:
    """An empty MLflow sqlite store for one test, a copy of :func:`empty_mlflow_db` (exported,
    so subprocesses use it too)."""
    from tests._dummies.mlflow_store import copy_empty_store

    uri = copy_empty_store(empty_mlflow_db, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def digits_config() -> ExperimentConfig:
    """The shipped default experiment (digits + small CNN + PWFN)."""
    return load_config(DEFAULT_CONFIG)


@pytest.fixture(scope="session")
def digits(digits_config: ExperimentConfig) -> ImageDataset:
    return load_dataset(digits_config.data)


@pytest.fixture(scope="session")
def pretrained_state(digits_config, digits):
    """State dict and test metrics of the default small CNN pretrained on digits (seeded)."""
    model = build_experiment_model(digits_config, digits)
    result = pretrain(model, digits, digits_config, "cpu", progress=False)
    return copy.deepcopy(model.state_dict()), result


@pytest.fixture
def pretrained_cnn(digits_config, digits, pretrained_state):
    """A fresh copy of the pretrained small CNN."""
    model = build_experiment_model(digits_config, digits)
    model.load_state_dict(pretrained_state[0])
    return model
