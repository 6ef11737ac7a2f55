"""Every shipped sweep file runs to its end through ``pwf sweep``, on a tiny base: real Optuna
storage, a real Prefect server and MLflow store. Its parent run holds the summary, the trials
table and the front; a rerun of the finished sweep changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pwf_flows.cli import main as pwf_main
from tests._dummies.files import write_weights
from tests.conftest import ROOT
from tests.test_example_configs import SHIPPED, narrow

# The methods sweep (60 runs) runs to its end in tests/test_report.py, whose report checks it.
ELSEWHERE = {ROOT / "sweeps" / "methods.yaml"}
SWEEPS = sorted(set((ROOT / "sweeps").rglob("*.yaml")) - ELSEWHERE)
# A trial of seconds: two pretraining epochs (shared by every sweep), two fixing rounds with a
# tenth of an epoch before each, no sampled evaluation; 2DGBNN with one epoch per stage. A
# space that searches one of these (the schedule) still does.
TINY = {"pretrain.epochs": 2, "train.epochs": 0.1, "eval.mc_samples": 0}
TINY_FIXING = {"schedule": [0.5, 1.0]}
TINY_2DGBNN = {"bnn_epochs": 1, "vi_epochs": 2, "eval_samples": 2, "step_samples": 1}
FEWER_TRIALS = 3  # samplers that are not a grid: a study of three trials, run to its end
PAPER_TRIALS = 2  # the papers' grids (sweeps/papers/): two of their points, run to the end


def tiny_overrides(
    path: Path,
    storage: str,
    artifacts: Path,
    n_trials: int | None = None,
    files: Path | None = None,
    replicates: int | None = 1,
) -> dict:
    """Sweep fields that make the shipped sweep at ``path`` cheap without changing its space
    (except that its choices of method train for fewer epochs and rounds, and its choices of
    model are narrow versions of the same architectures).

    Args:
        n_trials: Complete trials wanted (default: the whole grid, or :data:`FEWER_TRIALS`; a
            paper's grid, :data:`PAPER_TRIALS`).
        files: Folder for the dummy dataset and weights files of a base that reads them.
        replicates: Seeds a trial runs under (``None``: the sweep's own).
    """
    values = yaml.safe_load(path.read_text())
    base_path = path.parent / values["base"]
    base = yaml.safe_load(base_path.read_text())
    knobs = TINY_2DGBNN if base["compression"]["method"] == "2dgbnn" else TINY_FIXING
    tiny = TINY | {f"compression.{key}": value for key, value in knobs.items()}
    if not base["pretrain"]["epochs"]:
        tiny["pretrain.epochs"] = 0  # a weights file is the pretrained model
    if SHIPPED[base_path.name] is not None:
        assert files is not None, f"{path.name} reads dataset files: give a folder for them"
        tiny |= SHIPPED[base_path.name](files, base_path, **narrow(base["model"]["name"]))
        if "model" in values["space"]:
            tiny.pop("model.kwargs", None)  # each choice of model brings its own
    elif narrow(base["model"]["name"]):
        tiny["model.kwargs"] = narrow(base["model"]["name"])
    fields: dict = {
        "overrides": {**values.get("overrides", {}), **tiny},
        "study.storage": storage,
        "study.heartbeat_s": 2,
        "execution.artifacts_dir": str(artifacts),
    }
    if replicates is not None:  # one seed a trial, by default: replicates run to their end in
        fields["study.replicates"] = replicates  # tests/test_report.py and test_replicates.py
    if path.parent.name == "papers":
        n_trials = n_trials or PAPER_TRIALS
    if n_trials is not None or values["study"].get("sampler") != "grid":
        fields["study.n_trials"] = n_trials or FEWER_TRIALS
    choices = values["space"].get("compression", {}).get("choices", {})
    if choices:  # replaced whole: a label may hold a dot ("wfn b=5 d=0.1")
        fields["space.compression.choices"] = {
            label: choice | (TINY_2DGBNN if choice["method"] == "2dgbnn" else TINY_FIXING)
            for label, choice in choices.items()
        }
    for label, choice in values["space"].get("model", {}).get("choices", {}).items():
        assert files is not None, f"{path.name} chooses models: give a folder for their weights"
        kwargs = narrow(choice["name"])
        weights = write_weights(files / f"{label}.safetensors", choice["name"], 2, 3, 32, **kwargs)
        narrowed = {"weights": str(weights), "kwargs": kwargs}
        fields[f"space.model.choices.{label}"] = choice | narrowed
    return fields


@pytest.fixture(scope="module")
def shared_artifacts(tmp_path_factory) -> Path:
    """One artifacts folder for every sweep here: they share one cached pretraining."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweep_runs_to_its_end(
    path, prefect_server, mlflow_store, tmp_path, shared_artifacts, monkeypatch
):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    fields = tiny_overrides(path, storage, shared_artifacts, files=tmp_path / "files")
    items = [f"{key}={json.dumps(value)}" for key, value in fields.items()]
    argv = ["sweep", str(path), "--no-progress", *[a for i in items for a in ("--set", i)]]
    assert pwf_main(argv) == 0
    spec = yaml.safe_load(path.read_text())
    name = spec["name"]
    study = optuna.load_study(study_name=name, storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    wanted = FEWER_TRIALS if spec["study"].get("sampler") != "grid" else None
    wanted = PAPER_TRIALS if path.parent.name == "papers" else wanted
    if wanted is None:  # a grid: every point of it, once
        wanted = 1
        for dimension in spec["space"].values():
            wanted *= len(dimension["choices"])
        assert len({tuple(sorted(t.params.items())) for t in complete}) == wanted
    assert len(complete) == wanted
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL))

    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.run_id for c in children) == sorted(
        t.user_attrs["mlflow_run_id"] for t in complete
    )  # one MLflow run per trial, and no other
    for child in children:
        number = child.data.tags["sweep.trial"]
        assert child.info.status == "FINISHED"
        assert child.info.run_name.startswith(child.data.tags["method"] + " ")
        assert child.info.run_name.endswith(f" (trial {number})")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "cls/acc")]
        assert len(steps) == len(set(steps)), "a step was logged twice"
    metrics = parent.data.metrics
    assert metrics["sweep/complete_trials"] == wanted
    assert metrics["sweep/best_accuracy"] == max(t.values[0] for t in complete)
    logged = {
        a.path
        for folder in ("tables", "plots")
        for a in client.list_artifacts(parent.info.run_id, folder)
    }
    assert {"tables/trials.parquet", "plots/pareto_front.png"} <= logged

    # The finished sweep again: nothing changes, not even its timings or its Prefect link.
    assert pwf_main(argv) == 0
    again = client.get_run(parent.info.run_id)
    assert again.data.metrics == metrics and again.data.tags == parent.data.tags
    assert again.info.end_time == parent.info.end_time
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)
