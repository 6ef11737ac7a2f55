"""The tasks of the ``pwf-experiment`` flow: pretrain, prepare, one per step, evaluate.

Each is a thin call into :class:`pwf_core.Compression` and writes a checkpoint (or, at the end,
the results) that the next one, in this process or another, starts from.
"""

from __future__ import annotations

import errno
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pwf_core import Compression
from pwf_core._files import atomic_path, write_text_atomic
from pwf_core.checkpoint import load_checkpoint, read_checkpoint_header, save_checkpoint
from pwf_core.config import DataConfig, ExperimentConfig, parse_config
from pwf_core.data import ImageDataset, InputContract, load_dataset
from pwf_core.export import save_compressed
from pwf_core.methods import Step, StepRecord
from pwf_core.methods.base import history
from pwf_core.metrics import reliability_bins
from pwf_core.onnx_export import check_onnx, export_onnx
from pwf_core.pretrain import build_experiment_model, model_spec, pretrain
from pwf_flows.artifacts import (
    ExperimentFiles,
    experiment_settings,
    pretrain_key,
    usable_checkpoint,
)
from pwf_flows.distributed import lead, share_state
from pwf_flows.plots import accuracy_vs_unique_values, draw_figure, reliability_diagram


@lru_cache(maxsize=2)
def cached_dataset(data: DataConfig) -> ImageDataset:
    """The dataset of ``data``, loaded once per process (every task of a run shares it)."""
    return load_dataset(data)


def compression(config: ExperimentConfig, progress: bool) -> Compression:
    """A fresh (unconverted) run of ``config``, ready to restore a checkpoint into."""
    return Compression.from_config(
        config, cached_dataset(config.data), progress=progress, log=get_run_logger().info
    )


# The last step's model stays in memory, so the next task of the same process continues from
# it instead of rebuilding the model and reading back the checkpoint it just wrote. A task in
# another process (or after a crash) restores from the file: the same state, bit for bit.
_live: dict[str, Compression] = {}


def _remember(path: Path, run: Compression) -> None:
    _live.clear()
    _live[str(path)] = run


def _resume(config: ExperimentConfig, path: Path, progress: bool) -> Compression:
    run = _live.pop(str(path), None)
    if run is None:
        run = compression(config, progress)
        run.restore(path)
    run.context.log = get_run_logger().info  # this task's logger, not the one that built it
    return run


@task(name="pretrain", cache_policy=NO_CACHE, task_run_name="pretrain")
def pretrain_task(config: dict[str, Any], artifacts_dir: str, progress: bool = True) -> dict:
    """Train the deterministic model, or reuse the cached file for the same pretraining."""
    cfg = parse_config(config)
    path = ExperimentFiles.for_config(cfg, artifacts_dir).pretrained_model
    logger = get_run_logger()
    if usable_checkpoint(path, logger.warning):
        header = read_checkpoint_header(path)
        logger.info("reusing cached pretraining %s (key %s)", path, pretrain_key(cfg))
        acc = header["test_metrics"]["cls/acc"]
        return {"path": str(path), "cached": True, "test_acc": acc, "seconds": 0.0}
    dataset = cached_dataset(cfg.data)
    model = build_experiment_model(cfg, dataset)
    lead("pretrain")  # other ranks (pwf run --nproc) train in lockstep
    result = pretrain(model, dataset, cfg, cfg.resolved_device(), progress, log=logger.info)
    header = {
        "test_metrics": result.test_metrics,
        "epoch_losses": result.epoch_losses,
        "val_acc": result.val_acc,
        "seconds": result.seconds,
    }
    save_checkpoint(path, model, header=header)
    acc = result.test_metrics["cls/acc"]
    logger.info(
        "pretrained %s on %s: top-1 %.2f %% in %.1f s",
        cfg.model.name,
        cfg.data.name,
        100 * acc,
        result.seconds,
    )
    return {"path": str(path), "cached": False, "test_acc": acc, "seconds": result.seconds}


@task(name="prepare", cache_policy=NO_CACHE, task_run_name="prepare")
def prepare_task(
    config: dict[str, Any], pretrained: dict, artifacts_dir: str, progress: bool = True
) -> dict:
    """Convert conv/linear layers to (mu, sigma) and initialise them for the method."""
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    run = compression(cfg, progress)
    load_checkpoint(Path(pretrained["path"]), run.model)
    report = run.convert()
    share_state(run)
    run.save(files.init, {"conversion": report.summary()})
    _remember(files.init, run)
    get_run_logger().info(report.summary())
    return {"path": str(files.init), "converted": report.num_converted, "left": report.num_left}


def _entry(record: StepRecord) -> dict:
    step, table = record.step, record.table
    return {
        "step": step.index,
        "stage": step.stage,
        "number": step.number,
        "of": step.of,
        "fraction": step.fraction,
        "metrics": record.metrics,
        "table": json.loads(table.to_json(orient="records")) if not table.empty else [],
    }


def step_history(path: Path) -> list[StepRecord]:
    """What every step up to the checkpoint at ``path`` recorded, in order.

    Each step checkpoint carries the whole history in its header, so the last one alone is
    enough to resume, to rebuild the tables and to log what a crash kept from MLflow.
    """
    return [
        StepRecord(
            Step(e["step"], e["stage"], e["number"], e["of"], e["fraction"]),
            e["metrics"],
            pd.DataFrame(e["table"]),
        )
        for e in read_checkpoint_header(path).get("history", [])
    ]


@task(name="step", cache_policy=NO_CACHE, task_run_name="{label}")
def step_task(
    config: dict[str, Any],
    index: int,
    previous: dict,
    artifacts_dir: str,
    label: str,
    progress: bool = True,
) -> dict:
    """Run one step of the method (PWFN: train, fix, evaluate) and write its checkpoint."""
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    run = _resume(cfg, Path(previous["path"]), progress)
    share_state(run)
    lead("step", index)
    earlier = read_checkpoint_header(Path(previous["path"])).get("history", [])
    record = run.run_step(index)
    path = files.step(index)
    entry = _entry(record)
    run.save(path, {**entry, "history": [*earlier, entry]})
    _remember(path, run)
    if not cfg.execution.keep_checkpoints:
        files.prune(index + 1)  # only after the new checkpoint is whole on disk
    return {"path": str(path), "label": label, "metrics": record.metrics}


def _tables(records: list[StepRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per step; one row per greedy fixing step (or whatever a method's steps detail)."""
    detail = [
        {"round": record.step.number, **row}
        for record in records
        for row in record.table.to_dict(orient="records")
    ]
    return history(records), pd.DataFrame(detail)


def _onnx(run: Compression, path: Path, contract: InputContract | None) -> dict[str, float]:
    """Write the compressed model as ONNX (codebook + indices, the dataset's input contract
    among its metadata) and check it in ONNX Runtime on a test batch: ``size/onnx_bytes``,
    ``size/onnx_float_bytes`` and ``export/onnx_max_logit_diff``. A model the exporter cannot
    take costs the run nothing but a warning (the compressed file is what the run promises)."""
    batch = next(iter(run.context.eval_loader))[0][:64].cpu()
    try:
        written = export_onnx(run.model, path, batch, contract=contract)
        difference = check_onnx(written.path, run.model, batch)
    except Exception as err:  # an architecture torch.onnx cannot trace, a runtime missing
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise  # a full disk ends the run as every other write's does (a rerun resumes)
        get_run_logger().warning("no ONNX export: %s: %s", type(err).__name__, err)
        path.unlink(missing_ok=True)
        return {}
    return written.as_metrics() | {"export/onnx_max_logit_diff": difference}


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate")
def evaluate_task(
    config: dict[str, Any],
    last_step: dict,
    artifacts_dir: str,
    pretrained_acc: float | None = None,
    title: str = "",
) -> dict:
    """Final metrics, tables, plots and the compressed model."""
    started = time.perf_counter()
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    run = _resume(cfg, Path(last_step["path"]), progress=False)
    metrics = run.finalize()
    export = save_compressed(
        run.model,
        files.final / "model.pwf.safetensors",
        spec=model_spec(cfg, cached_dataset(cfg.data)),
        config=experiment_settings(cfg),
        contract=cached_dataset(cfg.data).contract,
    )
    metrics |= export.as_metrics()
    steps, detail = _tables(step_history(Path(last_step["path"])))
    outputs = {
        "steps": files.final / "steps.parquet",
        "detail": files.final / "detail.parquet",
        "model": export.path,
    }
    onnx_metrics = _onnx(run, files.final / "model.onnx", cached_dataset(cfg.data).contract)
    if onnx_metrics:
        metrics |= onnx_metrics
        outputs["onnx"] = files.final / "model.onnx"
    for name, frame in (("steps", steps), ("detail", detail)):
        with atomic_path(outputs[name]) as tmp:
            frame.to_parquet(tmp, index=False)
    if "ws/unique_fixed_values" in steps:
        outputs["plot"] = accuracy_vs_unique_values(
            steps.dropna(subset=["ws/unique_fixed_values"]),
            files.final / "acc_vs_unique_values.png",
            title,
            pretrained_acc,
        )
    if run.context.final_predictions is not None:
        log_probs, labels = run.context.final_predictions
        metrics["data/test_samples"] = float(len(labels))  # one sample is 100 / n points
        bins = reliability_bins(log_probs.exp(), labels)
        outputs["reliability_bins"] = write_text_atomic(
            files.final / "reliability.json", json.dumps(bins)
        )
        outputs["reliability"] = reliability_diagram(
            bins, files.final / "reliability.png", title, metrics.get("cal/ece")
        )
    for figure in run.method.figures(run.model, cfg.compression_seed):
        outputs[figure.name] = draw_figure(figure, files.final / f"{figure.name}.png", title)
    summary = {
        "metrics": metrics,
        "knobs": run.method.size_knobs(),
        "outputs": {k: str(v) for k, v in outputs.items()},
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(files.summary, json.dumps(summary, indent=2))
    get_run_logger().info(
        "final: %s; %s: %s bytes entropy-coded (%s at fixed length; bound %s + header %s), "
        "%.1fx smaller than float32",
        run.method.summary_line(metrics),
        export.path.name,
        f"{export.file_bytes:,}",
        f"{export.fixed_length_bytes:,}",
        f"{export.entropy_bound_bytes:,}",
        f"{export.header_bytes:,}",
        export.compression_ratio,
    )
    if "onnx" in outputs:
        get_run_logger().info(
            "model.onnx: %s bytes (float ONNX %s), largest logit difference in ONNX Runtime %.1e",
            f"{int(metrics['size/onnx_bytes']):,}",
            f"{int(metrics['size/onnx_float_bytes']):,}",
            metrics["export/onnx_max_logit_diff"],
        )
    return summary
