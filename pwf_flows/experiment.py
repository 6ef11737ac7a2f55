"""The ``pwf-experiment`` flow: pretrain → init_variance → fixing_round × R → evaluate.

Tasks are thin calls into :mod:`pwf_core`; they pass checkpoint paths, not tensors. Pretraining
is cached by what determines it (a second experiment with the same model, data, pretraining and
seed reuses the file). Every round writes a checkpoint, so rerunning the same command after a
crash continues at the first unfinished round, in the same MLflow run.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.artifacts import (
    ExperimentFiles,
    load_model_checkpoint,
    pretrain_key,
    read_header,
    round_header,
    run_key,
    save_model_checkpoint,
)
from flows.plots import accuracy_vs_unique_values
from flows.tracking import RunTracker, experiment_tags, tracking_uri
from pwf_core.bayes import to_bayesian
from pwf_core.checkpoint import atomic_path, write_text_atomic
from pwf_core.config import (
    DataConfig,
    ExperimentConfig,
    config_to_dict,
    flatten_config,
    parse_config,
)
from pwf_core.data import ImageDataset, load_dataset
from pwf_core.export import export_compressed
from pwf_core.methods import FixingMethod, create_method
from pwf_core.pretrain import build_experiment_model, model_spec, pretrain
from pwf_core.rounds import final_metrics, fixing_round, prepare_model

ROUND_LOG_KEYS = ("cls/acc", "ws/unique_values", "ws/fixed_fraction")


@lru_cache(maxsize=2)
def _dataset(data: DataConfig) -> ImageDataset:
    return load_dataset(data)


def _model_and_method(config: ExperimentConfig, checkpoint: Path) -> tuple[Any, FixingMethod]:
    """Rebuild the converted model and its method from a checkpoint."""
    dataset = _dataset(config.data)
    model = build_experiment_model(config, dataset)
    to_bayesian(model)
    method = create_method(config.fixing)
    method.attach(model)
    load_model_checkpoint(checkpoint, model, method)
    return model.to(config.resolved_device()), method


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(config: dict[str, Any], artifacts_dir: str, progress: bool = True) -> dict:
    """Train the deterministic model, or reuse the cached file for the same pretraining."""
    cfg = parse_config(config)
    path = ExperimentFiles.for_config(cfg, artifacts_dir).pretrained_model
    logger = get_run_logger()
    if path.is_file():
        header = read_header(path)
        logger.info("reusing cached pretraining %s (key %s)", path, pretrain_key(cfg))
        acc = header["test_metrics"]["cls/acc"]
        return {"path": str(path), "cached": True, "test_acc": acc, "seconds": 0.0}
    dataset = _dataset(cfg.data)
    model = build_experiment_model(cfg, dataset)
    result = pretrain(model, dataset, cfg, cfg.resolved_device(), progress)
    header = {
        "test_metrics": result.test_metrics,
        "epoch_losses": result.epoch_losses,
        "val_acc": result.val_acc,
        "seconds": result.seconds,
    }
    save_model_checkpoint(path, model, header=header)
    logger.info(
        "pretrained %s on %s: top-1 %.2f%% in %.1fs",
        cfg.model.name,
        cfg.data.name,
        100 * result.test_metrics["cls/acc"],
        result.seconds,
    )
    acc = result.test_metrics["cls/acc"]
    return {"path": str(path), "cached": False, "test_acc": acc, "seconds": result.seconds}


@task(name="init_variance", cache_policy=NO_CACHE)
def init_variance_task(config: dict[str, Any], pretrained: str, artifacts_dir: str) -> dict:
    """Convert conv/linear layers to (mu, sigma) and initialise sigma (the method's prior)."""
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    model = build_experiment_model(cfg, _dataset(cfg.data))
    load_model_checkpoint(Path(pretrained), model)
    method = create_method(cfg.fixing)
    report = prepare_model(model, method)
    save_model_checkpoint(files.init, model, method, {"conversion": report.summary()})
    get_run_logger().info(report.summary())
    return {"path": str(files.init), "converted": report.num_converted, "left": report.num_left}


@task(name="fixing_round", cache_policy=NO_CACHE, task_run_name="fixing_round-{round_index}")
def fixing_round_task(
    config: dict[str, Any],
    round_index: int,
    previous: str,
    artifacts_dir: str,
    progress: bool = True,
) -> dict:
    """Train the free weights, fix up to this round's fraction, evaluate, write a checkpoint."""
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    model, method = _model_and_method(cfg, Path(previous))
    record = fixing_round(
        model, method, round_index, cfg, _dataset(cfg.data), cfg.resolved_device(), progress
    )
    header = round_header(round_index, record.fraction, record.metrics, record.summary)
    save_model_checkpoint(files.round(round_index), model, method, header)
    m = record.metrics
    get_run_logger().info(
        "round %d/%d: fixed %.1f%% | %d unique values | top-1 %.2f%%",
        round_index + 1,
        len(cfg.fixing.schedule),
        100 * m["ws/fixed_fraction"],
        m["ws/unique_values"],
        100 * m["cls/acc"],
    )
    return {"path": str(files.round(round_index))} | {k: m[k] for k in ROUND_LOG_KEYS}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: dict[str, Any], final_round: str, artifacts_dir: str) -> dict:
    """Final metrics (sampling off and on), per-round tables, the plot and the compressed model."""
    started = time.perf_counter()
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    model, method = _model_and_method(cfg, Path(final_round))
    dataset = _dataset(cfg.data)
    metrics = final_metrics(model, method, cfg, dataset, cfg.resolved_device())
    export = export_compressed(
        model, files.final / "model.pwf.safetensors", model_spec(cfg, dataset), config_to_dict(cfg)
    )
    metrics |= export.as_metrics()
    headers = [read_header(files.round(r)) for r in range(len(cfg.fixing.schedule))]
    rounds = pd.DataFrame(
        [{"round": h["round"], "fraction": h["fraction"], **h["metrics"]} for h in headers]
    )
    centres = pd.DataFrame([{"round": h["round"], **row} for h in headers for row in h["summary"]])
    outputs = {
        "rounds": files.final / "rounds.parquet",
        "centres": files.final / "centres.parquet",
        "plot": files.final / "acc_vs_unique_values.png",
        "model": export.path,
    }
    for name in ("rounds", "centres"):
        with atomic_path(outputs[name]) as tmp:
            (rounds if name == "rounds" else centres).to_parquet(tmp, index=False)
    title = f"{cfg.name}: {cfg.fixing.method} on {cfg.model.name}/{cfg.data.name}"
    accuracy_vs_unique_values(rounds, outputs["plot"], title)
    summary = {
        "metrics": metrics,
        "outputs": {k: str(v) for k, v in outputs.items()},
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(files.summary, json.dumps(summary, indent=2))
    get_run_logger().info(
        "final: top-1 %.2f%% (sampled %.2f%%), %d unique values, %s, %.1fx smaller than float32",
        100 * metrics["cls/acc"],
        100 * metrics.get("cls/acc_mc", metrics["cls/acc"]),
        metrics["ws/unique_values"],
        export.path.name,
        export.compression_ratio,
    )
    return summary


def _run_name() -> str:
    config = flow_run.parameters.get("config") or {}
    fixing = config.get("fixing") or {}
    return f"{config.get('name', 'pwf-default')}-{fixing.get('method', 'pwfn')}"


def _log_pretraining(tracker: RunTracker, pretrained: dict) -> None:
    header = read_header(Path(pretrained["path"]))
    for epoch, loss in enumerate(header["epoch_losses"]):
        tracker.log_metrics({"pretrain/loss": loss}, step=epoch)
    for epoch, acc in enumerate(header["val_acc"]):
        tracker.log_metrics({"pretrain/val_acc": acc}, step=epoch)
    tracker.log_metrics(
        {f"pretrain/test_{k.split('/')[-1]}": v for k, v in header["test_metrics"].items()}
    )
    tracker.set_tags({"pretrain.cached": pretrained["cached"], "pretrain.path": pretrained["path"]})


def _log_rounds(
    tracker: RunTracker, files: ExperimentFiles, finished: int, logged: set[int]
) -> None:
    """Log every finished round MLflow does not have yet (a crash can fall between the two)."""
    for index in range(finished):
        if index not in logged:
            tracker.log_metrics(read_header(files.round(index))["metrics"], step=index)
            logged.add(index)


@flow(name="pwf-experiment", flow_run_name=_run_name, log_prints=True)
def pwf_experiment(
    config: dict[str, Any] | None = None,
    artifacts_dir: str = "artifacts",
    parent_run_id: str | None = None,
    progress: bool = True,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment and record it in MLflow.

    Args:
        config: Experiment config as a mapping (see :class:`~pwf_core.config.ExperimentConfig`);
            validated before anything runs.
        artifacts_dir: Root of checkpoints, the pretraining cache and final outputs.
        parent_run_id: MLflow run to nest this one under (a sweep's run).
        progress: Show progress bars while training.
        tags: Extra MLflow tags (a sweep marks its trials with them).

    Returns:
        The MLflow run id, the experiment folder, the tracking URI and the final metrics.
    """
    cfg = parse_config(config or {})
    values = config_to_dict(cfg)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    logger = get_run_logger()
    num_rounds = len(cfg.fixing.schedule)
    resume_id = files.mlflow_run_id.read_text().strip() if files.mlflow_run_id.is_file() else None
    tracker = RunTracker.start(
        cfg.name, _run_name(), experiment_tags(cfg), parent_run_id, resume_run_id=resume_id
    )
    write_text_atomic(files.mlflow_run_id, tracker.run_id)
    started = time.perf_counter()
    try:
        if not files.config.is_file():
            write_text_atomic(files.config, yaml.safe_dump(values, sort_keys=False))
        tracker.log_params(flatten_config(cfg))
        tracker.set_tags({"run_key": run_key(cfg), "artifacts": str(files.root), **(tags or {})})
        compute_s = 0.0  # time in pwf_core (training, fixing, evaluation), not orchestration
        finished = files.finished_rounds(num_rounds)
        logged = tracker.logged_steps("ws/unique_values")
        if finished:
            logger.info(
                "resuming %s at round %d/%d (MLflow run %s)",
                files.root,
                finished + 1,
                num_rounds,
                tracker.run_id,
            )
            tracker.set_tags({"resumed_at_round": finished})
        if finished == 0 and not files.init.is_file():
            pretrained = pretrain_task(values, artifacts_dir, progress)
            compute_s += pretrained["seconds"]
            _log_pretraining(tracker, pretrained)
            init_variance_task(values, pretrained["path"], artifacts_dir)
        previous = files.round(finished - 1) if finished else files.init
        _log_rounds(tracker, files, finished, logged)
        for index in range(finished, num_rounds):
            previous = Path(
                fixing_round_task(values, index, str(previous), artifacts_dir, progress)["path"]
            )
            _log_rounds(tracker, files, index + 1, logged)
            times = read_header(previous)["metrics"]
            compute_s += times["time/train_s"] + times["time/fix_s"] + times["time/eval_s"]
        if files.summary.is_file() and tracker.logged_steps("final/cls/acc"):
            logger.info("experiment already complete: %s", files.summary)
            summary = json.loads(files.summary.read_text())
        else:
            summary = evaluate_task(values, str(previous), artifacts_dir)
            compute_s += summary["seconds"]
            tracker.log_metrics({f"final/{k}": v for k, v in summary["metrics"].items()})
            tracker.log_artifact(files.config)
            outputs = summary["outputs"]
            tracker.log_artifact(Path(outputs["rounds"]), "tables")
            tracker.log_artifact(Path(outputs["centres"]), "tables")
            tracker.log_artifact(Path(outputs["plot"]), "plots")
            tracker.log_artifact(Path(outputs["model"]), "model")
        timing = {"time/experiment_s": time.perf_counter() - started, "time/compute_s": compute_s}
        tracker.log_metrics(timing)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return {
        "run_id": tracker.run_id,
        "experiment": cfg.name,
        "artifacts": str(files.root),
        "tracking_uri": tracking_uri(),
        "metrics": summary["metrics"],
        "timing": timing,
    }
