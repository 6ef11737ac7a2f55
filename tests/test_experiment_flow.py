"""The pwf-experiment flow against a real Prefect server and a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from pwf_core._files import CheckpointError
from pwf_core.config import ConfigError, config_to_dict, load_config
from pwf_flows.artifacts import ExperimentFiles
from pwf_flows.experiment import default_run_name, pwf_experiment
from tests._dummies.mlflow_store import assert_logged_once
from tests._dummies.services import wait_until
from tests.conftest import DEFAULT_CONFIG, ROOT

ROUND_METRICS = [
    "cls/acc",
    "cls/acc5",
    "cls/nll",
    "cal/ece",
    "ws/unique_values",
    "ws/unique_fixed_values",
    "ws/fixed_fraction",
    "ws/entropy_bits",
]
SMALL = {
    "pretrain.epochs": 6,
    "train.epochs": 0.5,
    "compression.schedule": [0.4, 0.8, 1.0],
    "eval.mc_samples": 2,
}


def small_config(**overrides) -> dict:
    return config_to_dict(load_config(DEFAULT_CONFIG, {**SMALL, **overrides}))


def runs_of(experiment: str) -> list:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def task_runs_of(flow_run_id: str) -> dict:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        flow_run = client.read_flow_run(flow_run_id)
    return {"tasks": {run.name: run for run in runs}, "artifacts": artifacts, "flow": flow_run}


def upstream(task_run, parameter: str) -> set[str]:
    return {str(item.id) for item in task_run.task_inputs.get(parameter, [])}


@pytest.mark.integration
def test_flow_logs_every_step_links_and_artifacts(prefect_server, mlflow_store, tmp_path):
    config = small_config(name="flow-e2e")
    result = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    (run,) = runs_of("flow-e2e")
    run_id = run.info.run_id
    assert run_id == result["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == default_run_name(load_config(overrides=config))
    assert run.info.run_name.startswith("pwfn-small_cnn-digits-")
    client = MlflowClient()
    for key in ROUND_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [1, 2, 3], key  # rounds are numbered from 1, as people read them
    assert client.get_metric_history(run_id, "ws/fixed_fraction")[-1].value == 1.0
    fixed_counts = [m.value for m in client.get_metric_history(run_id, "ws/unique_fixed_values")]
    assert max(fixed_counts) <= 64  # the readable count, not the ~28,000 free values
    assert len(client.get_metric_history(run_id, "pretrain/loss")) == 6
    tags, params = run.data.tags, run.data.params
    assert params["compression.reg"] == str(2**-11) and params["model.name"] == "small_cnn"
    assert tags["method"] == "pwfn" and tags["mlflow.source.name"] == "pwf-experiment"
    assert len(tags["mlflow.source.git.commit"]) in (40, len("unknown"))
    assert tags["mlflow.user"] and "pwfn on small_cnn / digits" in tags["mlflow.note.content"]
    # MLflow -> Prefect: the flow run the tag names is this run's, under the same name.
    prefect = task_runs_of(tags["prefect.flow_run_id"])
    assert prefect["flow"].name == run.info.run_name
    # Prefect -> MLflow: a markdown artifact with the per-round table and the run's URL.
    (artifact,) = [a for a in prefect["artifacts"] if a.type == "markdown"]
    assert result["url"] in artifact.data and f"/runs/{run_id}" in result["url"]
    assert "| round 3/3 |" in artifact.data and "**final**" in artifact.data
    # Prefect's graph is the real chain: each task's input is the previous task's result.
    tasks = prefect["tasks"]  # named without Prefect's random suffixes
    assert set(tasks) == {
        "pretrain",
        "prepare",
        "round 1 of 3",
        "round 2 of 3",
        "round 3 of 3",
        "evaluate",
    }
    assert upstream(tasks["prepare"], "pretrained") == {str(tasks["pretrain"].id)}
    chain = [tasks["round 1 of 3"], tasks["round 2 of 3"], tasks["round 3 of 3"]]
    assert upstream(chain[0], "previous") == {str(tasks["prepare"].id)}
    assert upstream(chain[1], "previous") == {str(chain[0].id)}
    assert upstream(chain[2], "previous") == {str(chain[1].id)}
    assert upstream(tasks["evaluate"], "last_step") == {str(chain[2].id)}
    logged = {
        f.path
        for folder in ("tables", "plots", "model")
        for f in client.list_artifacts(run_id, folder)
    }
    assert logged == {
        "tables/steps.parquet",
        "tables/detail.parquet",
        "plots/acc_vs_unique_values.png",
        "tables/reliability.json",  # the bins pwf report draws
        "plots/reliability.png",
        "model/model.pwf.safetensors",
        "model/model.onnx",
    }
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    assert result["metrics"]["ws/unique_values"] <= 64

    # Rerunning a finished experiment leaves its run exactly as it was.
    before = client.get_run(run_id)
    again = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    after = client.get_run(run_id)
    assert again["already_complete"] and again["run_id"] == run_id
    assert again["metrics"] == result["metrics"]
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.metrics == before.data.metrics and after.data.tags == before.data.tags
    assert len(client.get_metric_history(run_id, "time/experiment_s")) == 1
    assert len(runs_of("flow-e2e")) == 1


@pytest.mark.integration
def test_fresh_run_starts_over_and_keeps_the_old_run(prefect_server, mlflow_store, tmp_path):
    config = small_config(name="fresh", **{"compression.schedule": [0.5, 1.0]})
    first = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    second = pwf_experiment(
        config=config, artifacts_dir=str(tmp_path / "a"), progress=False, fresh=True
    )
    assert second["run_id"] != first["run_id"] and not second["already_complete"]
    assert second["metrics"] == first["metrics"]  # same config, same seed, same numbers
    statuses = {r.info.run_id: r.info.status for r in runs_of("fresh")}
    assert statuses == {first["run_id"]: "FINISHED", second["run_id"]: "FINISHED"}


@pytest.mark.integration
def test_second_experiment_reuses_pretraining(prefect_server, mlflow_store, tmp_path):
    artifacts = str(tmp_path / "a")
    first = small_config(name="cache-a")
    pwf_experiment(config=first, artifacts_dir=artifacts, progress=False)
    pretrained = ExperimentFiles.for_config(
        load_config(overrides=first), artifacts
    ).pretrained_model
    stamp = pretrained.stat().st_mtime_ns
    second = small_config(name="cache-b", **{"compression.reg": 0.001})
    pwf_experiment(config=second, artifacts_dir=artifacts, progress=False)
    assert pretrained.stat().st_mtime_ns == stamp
    (run_a,), (run_b,) = runs_of("cache-a"), runs_of("cache-b")
    assert run_a.data.tags["pretrain.cached"] == "False"
    assert run_b.data.tags["pretrain.cached"] == "True"
    assert run_b.data.tags["pretrain.path"] == str(pretrained)


@pytest.mark.integration
def test_bad_config_fails_before_any_run(prefect_server, mlflow_store, tmp_path):
    bad = small_config(name="bad-config")
    bad["compression"]["schedule"] = [0.5, 0.3, 1.0]
    with pytest.raises(ConfigError, match="strictly increasing"):
        pwf_experiment(config=bad, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert runs_of("bad-config") == [] and not (tmp_path / "a").exists()


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


@pytest.mark.integration
def test_truncated_last_checkpoint_falls_back_to_the_one_before(
    prefect_server, mlflow_store, tmp_path
):
    config = small_config(name="truncated", **{"execution.keep_checkpoints": True})
    first = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    files = ExperimentFiles.for_config(load_config(overrides=config), tmp_path / "a")
    files.summary.unlink()
    last = files.step(2)
    last.write_bytes(last.read_bytes()[:-100])  # a disk that filled up mid-write
    earlier = [files.step(i).stat().st_mtime_ns for i in range(2)]
    again = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert again["run_id"] == first["run_id"] and again["metrics"] == first["metrics"]
    assert last.with_name(last.name + ".corrupt").is_file()
    assert [files.step(i).stat().st_mtime_ns for i in range(2)] == earlier
    (run,) = runs_of("truncated")
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "cls/acc"))
    assert steps == [1, 2, 3]  # round 3 was run again, and logged once


@pytest.mark.integration
def test_a_lost_final_folder_and_a_damaged_only_checkpoint_are_repaired_by_a_rerun(
    prefect_server, mlflow_store, tmp_path
):
    """Each resume path logs nothing twice: the final evaluation redone after its folder was
    lost, and every round redone after the one checkpoint kept was overwritten with random
    bytes (it is set aside as ``*.corrupt``; the rounds reseed, so the numbers are the same)."""
    config = small_config(name="repaired")
    first = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    files = ExperimentFiles.for_config(load_config(overrides=config), tmp_path / "a")
    client = MlflowClient()

    shutil.rmtree(files.final)
    again = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert again["run_id"] == first["run_id"] and again["metrics"] == first["metrics"]
    for key in ("final/cls/acc", "final/size/file_bytes", "time/experiment_s"):
        assert len(client.get_metric_history(first["run_id"], key)) == 1, key

    (only,) = [path for _, path in files.checkpoints()]
    only.write_bytes(os.urandom(only.stat().st_size))
    files.summary.unlink()
    repaired = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert repaired["run_id"] == first["run_id"] and repaired["metrics"] == first["metrics"]
    assert only.with_name(only.name + ".corrupt").is_file()
    (run,) = runs_of("repaired")
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "cls/acc"))
    assert steps == [1, 2, 3]
    assert_logged_once(mlflow_store)


def _pwf_command(config_path: Path, artifacts: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pwf_flows.cli",
        "run",
        str(config_path),
        "--artifacts",
        str(artifacts),
        "--no-progress",
    ]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_round_resumes_without_rerunning_finished_rounds(
    prefect_server, mlflow_store, tmp_path
):
    values = small_config(
        name="resume",
        **{
            "compression.schedule": [0.2, 0.4, 0.6, 0.8, 0.9, 1.0],
            "train.epochs": 2.0,
            "execution.keep_checkpoints": True,  # to show the finished rounds stay untouched
        },
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
    wait_until(files.step(1).is_file, "round 2 to finish", 300, poll=0.05, processes=[process])
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = files.finished_steps(6)
    assert 2 <= finished < 6 and not files.summary.is_file()
    assert not list(files.root.glob(".*.tmp"))  # no half-written file left behind
    stamps = {i: files.step(i).stat().st_mtime_ns for i in range(finished)}
    (killed_run,) = runs_of("resume")
    assert killed_run.info.status == "RUNNING"  # SIGKILL leaves no chance to close it
    killed_flow_run = json.loads((files.root / "prefect_run.json").read_text())["flow_run"]
    assert task_runs_of(killed_flow_run)["flow"].state.type.value == "RUNNING"

    rerun = subprocess.run(
        _pwf_command(config_path, artifacts),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"at round {finished + 1}/6" in output
    # The finished rounds were not run again: their checkpoints are the very same files, and no
    # task ran them.
    assert {i: files.step(i).stat().st_mtime_ns for i in range(finished)} == stamps
    for number in range(1, finished + 1):
        assert f"'round {number} of 6'" not in output
    (run,) = runs_of("resume")
    assert run.info.run_id == killed_run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_at"] == f"round {finished + 1}/6"
    history = MlflowClient().get_metric_history(run.info.run_id, "ws/unique_values")
    assert sorted(m.step for m in history) == list(range(1, 7))  # each round logged once
    killed = task_runs_of(killed_flow_run)  # the rerun closed what the killed process left
    assert killed["flow"].state.type.value == "CRASHED"
    assert "continued by flow run" in killed["flow"].state.message
    assert all(task.state.is_final() for task in killed["tasks"].values())

    uninterrupted = pwf_experiment(
        config=values, artifacts_dir=str(tmp_path / "clean"), progress=False
    )
    resumed = json.loads(files.summary.read_text())["metrics"]
    assert resumed == uninterrupted["metrics"]  # bit for bit


GBNN_QUICK = {
    "pretrain.epochs": 6,
    "compression.bnn_epochs": 2,
    "compression.vi_epochs": 3,
    "compression.eval_samples": 4,
    "compression.step_samples": 2,
}


@pytest.mark.integration
def test_2dgbnn_flow_logs_its_stages_and_resumes_at_the_next_epoch(
    prefect_server, mlflow_store, tmp_path
):
    config = config_to_dict(
        load_config(
            ROOT / "configs" / "2dgbnn.yaml",
            {**GBNN_QUICK, "name": "gbnn", "execution.keep_checkpoints": True},
        )
    )
    first = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    (run,) = runs_of("gbnn")
    client = MlflowClient()
    run_id = run.info.run_id
    gaussians = client.get_metric_history(run_id, "ws/shared_values")
    assert sorted(m.step for m in gaussians) == [3, 4, 5, 6]  # mixture, then 3 VI epochs
    for key in ("ws/outliers", "bnn/blended", "size/trainable_params", "size/bytes", "cls/nll"):
        assert client.get_metric_history(run_id, key), key
    assert sorted(m.step for m in client.get_metric_history(run_id, "size/bytes")) == list(
        range(1, 7)
    )
    final = run.data.metrics
    for key in ("cls/acc", "cls/nll", "cal/ece", "ws/shared_values", "meanfield/cls/acc"):
        assert f"final/{key}" in final, key
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/mixture.png", "plots/reliability.png"}

    files = ExperimentFiles.for_config(load_config(overrides=config), tmp_path / "a")
    files.summary.unlink()
    for index in (3, 4, 5):  # a crash after the mixture step: the VI epochs are lost
        files.step(index).unlink()
    kept = [files.step(i).stat().st_mtime_ns for i in range(3)]
    again = pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert again["run_id"] == first["run_id"]
    assert again["metrics"] == first["metrics"]  # the same numbers, bit for bit
    assert [files.step(i).stat().st_mtime_ns for i in range(3)] == kept


@pytest.mark.integration
def test_only_the_newest_checkpoint_is_kept_and_its_size_was_foreseen(
    prefect_server, mlflow_store, tmp_path
):
    from pwf_core.checkpoint import checkpoint_size
    from pwf_core.data import load_dataset
    from pwf_core.pretrain import model_spec
    from pwf_core.registry import create_method

    config = small_config(name="kept")
    pwf_experiment(config=config, artifacts_dir=str(tmp_path / "a"), progress=False)
    cfg = load_config(overrides=config)
    files = ExperimentFiles.for_config(cfg, tmp_path / "a")
    assert [number for number, _ in files.checkpoints()] == [3] and not files.init.exists()
    spec = model_spec(cfg, load_dataset(cfg.data))
    foreseen = checkpoint_size(spec.build, create_method(cfg.compression)).checkpoint_bytes
    written = files.step(2).stat().st_size  # tensors plus a JSON header (the step history)
    assert foreseen <= written <= 1.1 * foreseen


@pytest.mark.integration
def test_a_crash_between_a_new_checkpoint_and_removing_the_old_one_resumes_from_the_new(
    prefect_server, mlflow_store, tmp_path
):
    """Every round's checkpoint kept, the last one and the results removed: the files a run
    leaves when it dies after writing round 2's checkpoint and before removing round 1's."""
    kept = small_config(name="between", **{"execution.keep_checkpoints": True})
    first = pwf_experiment(config=kept, artifacts_dir=str(tmp_path / "a"), progress=False)
    files = ExperimentFiles.for_config(load_config(overrides=kept), tmp_path / "a")
    files.step(2).unlink()
    files.summary.unlink()
    default = small_config(name="between")  # the same experiment, checkpoints pruned
    assert ExperimentFiles.for_config(load_config(overrides=default), tmp_path / "a") == files
    again = pwf_experiment(config=default, artifacts_dir=str(tmp_path / "a"), progress=False)
    assert again["run_id"] == first["run_id"] and again["metrics"] == first["metrics"]
    assert [number for number, _ in files.checkpoints()] == [3] and not files.init.exists()
    (run,) = runs_of("between")
    assert run.data.tags["resumed_at"] == "round 3/3"
    steps = sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "cls/acc"))
    assert steps == [1, 2, 3]  # round 3 ran again, and was logged once; rounds 1 and 2 did not
