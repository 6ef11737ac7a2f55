"""The pwf-experiment flow against a real Prefect server and a real MLflow sqlite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.artifacts import ExperimentFiles
from flows.cli import main as pwf_main
from flows.experiment import pwf_experiment
from pwf_core.checkpoint import CheckpointError
from pwf_core.config import ConfigError, config_to_dict, load_config
from tests.conftest import DEFAULT_CONFIG, ROOT

ROUND_METRICS = [
    "cls/acc",
    "cls/acc5",
    "cls/nll",
    "cal/ece",
    "ws/unique_values",
    "ws/fixed_fraction",
    "ws/entropy_bits",
]
SMALL = {
    "pretrain.epochs": 6,
    "train.epochs": 0.5,
    "fixing.schedule": [0.4, 0.8, 1.0],
    "eval.mc_samples": 2,
}


def small_config(**overrides) -> dict:
    return config_to_dict(load_config(DEFAULT_CONFIG, {**SMALL, **overrides}))


def runs_of(experiment: str) -> list:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


@pytest.mark.integration
def test_flow_logs_every_round_and_artifact(prefect_server, mlflow_store, tmp_path):
    config = small_config(name="flow-e2e")
    result = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    (run,) = runs_of("flow-e2e")
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    client = MlflowClient()
    for key in ROUND_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [0, 1, 2], key
    assert client.get_metric_history(run.info.run_id, "ws/fixed_fraction")[-1].value == 1.0
    assert len(client.get_metric_history(run.info.run_id, "pretrain/loss")) == 6
    assert run.data.params["fixing.reg"] == str(2**-11)
    assert run.data.params["model.name"] == "small_cnn"
    assert {"method", "model", "dataset", "git_commit"} <= set(run.data.tags)
    assert run.data.tags["method"] == "pwfn"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    nested = {
        f.path
        for folder in ("tables", "plots", "model")
        for f in client.list_artifacts(run.info.run_id, folder)
    }
    assert nested == {
        "tables/rounds.parquet",
        "tables/centres.parquet",
        "plots/acc_vs_unique_values.png",
        "model/model.pwf.safetensors",
    }
    assert result["metrics"]["ws/unique_values"] <= 64
    again = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert again["run_id"] == result["run_id"] and again["metrics"] == result["metrics"]
    assert len(client.get_metric_history(run.info.run_id, "final/cls/acc")) == 1  # not re-run
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_second_experiment_reuses_pretraining(prefect_server, mlflow_store, tmp_path):
    artifacts = str(tmp_path / "a")
    first = small_config(name="cache-a")
    pwf_experiment(config=first, artifacts_dir=artifacts, progress=False)
    pretrained = ExperimentFiles.for_config(
        load_config(overrides=first), artifacts
    ).pretrained_model
    stamp = pretrained.stat().st_mtime_ns
    second = small_config(name="cache-b", **{"fixing.reg": 0.001})
    pwf_experiment(config=second, artifacts_dir=artifacts, progress=False)
    assert pretrained.stat().st_mtime_ns == stamp
    (run_a,), (run_b,) = runs_of("cache-a"), runs_of("cache-b")
    assert run_a.data.tags["pretrain.cached"] == "False"
    assert run_b.data.tags["pretrain.cached"] == "True"
    assert run_b.data.tags["pretrain.path"] == str(pretrained)


@pytest.mark.integration
def test_bad_config_fails_before_any_run(prefect_server, mlflow_store, tmp_path, capsys):
    bad = small_config(name="bad-config")
    bad["fixing"]["schedule"] = [0.5, 0.3, 1.0]
    with pytest.raises(ConfigError, match="strictly increasing"):
        pwf_experiment(config=bad, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert runs_of("bad-config") == []
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad-cli", "model": {"name": "resnet_nope"}}))
    assert pwf_main(["run", str(path), "--artifacts", str(tmp_path / "a")]) == 2
    assert "model.name: unknown model 'resnet_nope'" in capsys.readouterr().err
    assert pwf_main(["run", str(path.with_name("missing.yaml"))]) == 2
    missing = tmp_path / "missing_data.yaml"
    missing.write_text(
        yaml.safe_dump({"name": "bad-cli", "data": {"name": "mnist", "path": "/no/mnist"}})
    )
    assert pwf_main(["run", str(missing)]) == 2
    assert "data.path: dataset path '/no/mnist' does not exist" in capsys.readouterr().err
    assert runs_of("bad-cli") == [] and not (tmp_path / "a").exists()


@pytest.mark.integration
def test_crashed_run_is_marked_failed(prefect_server, mlflow_store, tmp_path):
    weights = tmp_path / "corrupt.safetensors"
    weights.write_bytes(b"\x00" * 64)
    config = small_config(name="crash", **{"model.weights": str(weights)})
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors"):
        pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    (run,) = runs_of("crash")
    assert run.info.status == "FAILED"
    assert run.data.params["model.weights"] == str(weights)  # what was logged stays


def _pwf_command(config_path: Path, artifacts: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(config_path),
        "--artifacts",
        str(artifacts),
        "--no-progress",
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_mid_round_resumes_in_the_same_run(prefect_server, mlflow_store, tmp_path):
    values = small_config(
        name="resume",
        **{"fixing.schedule": [0.2, 0.4, 0.6, 0.8, 0.9, 1.0], "train.epochs": 2.0},
    )
    config_path = tmp_path / "resume.yaml"
    config_path.write_text(yaml.safe_dump(values))
    artifacts = tmp_path / "killed"
    files = ExperimentFiles.for_config(load_config(config_path), artifacts)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        _pwf_command(config_path, artifacts),
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while not files.round(1).is_file():
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "round 2 never finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not files.round(5).is_file() and not files.summary.is_file()
    assert not list(files.root.glob(".*.tmp"))  # no half-written file left behind
    (killed_run,) = runs_of("resume")
    assert killed_run.info.status == "RUNNING"  # SIGKILL leaves no chance to close it

    rerun = subprocess.run(
        _pwf_command(config_path, artifacts),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout + rerun.stderr
    (run,) = runs_of("resume")
    assert run.info.run_id == killed_run.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_at_round"]) >= 2
    history = MlflowClient().get_metric_history(run.info.run_id, "ws/unique_values")
    assert sorted(m.step for m in history) == list(range(6))  # each round logged once

    uninterrupted = pwf_experiment(
        config=values, artifacts_dir=str(tmp_path / "clean"), progress=False
    )
    resumed = MlflowClient().get_run(run.info.run_id).data.metrics
    for key, value in uninterrupted["metrics"].items():
        assert resumed[f"final/{key}"] == pytest.approx(value, abs=0, rel=1e-12), key


def test_cli_help_names_the_default_config():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "configs/default.yaml" in out
