"""The ``pwf-experiment`` flow: pretrain → prepare → step × N → evaluate.

Tasks are thin calls into :class:`pwf_core.Compression` (the same code path as
:func:`pwf_core.compress`); each step task receives the previous task's result, so Prefect's
graph is the real chain. Pretraining is cached by what determines it, and every step writes a
checkpoint: rerunning the same command after a crash continues at the first unfinished step,
in the same MLflow run. A finished experiment is left untouched unless a fresh run is asked for.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from pwf_core import Compression
from pwf_core._files import atomic_path, is_complete_safetensors, write_text_atomic
from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.checkpoint import load_checkpoint, read_checkpoint_header, save_checkpoint
from pwf_core.config import (
    DataConfig,
    ExperimentConfig,
    config_to_dict,
    flatten_config,
    parse_config,
)
from pwf_core.data import ImageDataset, load_dataset
from pwf_core.distributed import world_size
from pwf_core.export import save_compressed
from pwf_core.methods.base import Step
from pwf_core.methods.gbnn2d.sharing import mixture_snapshot, sharing_of
from pwf_core.metrics import predict_log_probs, reliability_bins
from pwf_core.pretrain import build_experiment_model, model_spec, pretrain
from pwf_core.registry import create_method
from pwf_flows.artifacts import ExperimentFiles, pretrain_key, run_key
from pwf_flows.distributed import lead, share_state
from pwf_flows.infra import set_infra_timeout
from pwf_flows.plots import accuracy_vs_unique_values, gaussian_scatter, reliability_diagram
from pwf_flows.results import finished_result
from pwf_flows.run_lock import exclusive_run
from pwf_flows.tracking import RunTracker, standard_tags, tracked_run, tracking_uri
from pwf_flows.trials import owned_trial

TABLE_KEYS = (
    ("ws/fixed_fraction", "fixed", lambda v: f"{100 * v:.1f} %"),
    ("ws/unique_fixed_values", "unique values", lambda v: f"{int(v)}"),
    ("bnn/gaussians", "Gaussians", lambda v: f"{int(v)}"),
    ("cls/acc", "top-1", lambda v: f"{100 * v:.2f} %"),
    ("cal/ece", "ECE", lambda v: f"{v:.4f}"),
)


def default_run_name(config: ExperimentConfig) -> str:
    """What tells this run from its neighbours: method, model, data and a config hash."""
    return (
        f"{config.compression.method}-{config.model.name}-{config.data.name}-{run_key(config)[:6]}"
    )


def _flow_run_name() -> str:
    parameters = flow_run.parameters
    if parameters.get("run_name"):
        return str(parameters["run_name"])
    try:
        return default_run_name(parse_config(parameters.get("config") or {}))
    except ValueError:
        return "pwf-experiment (invalid config)"


@lru_cache(maxsize=2)
def _dataset(data: DataConfig) -> ImageDataset:
    return load_dataset(data)


def _compression(
    config: ExperimentConfig, progress: bool, log: Callable[[str], None] | None
) -> Compression:
    """A fresh (unconverted) model for ``config`` with its loaders, ready to restore into."""
    dataset = _dataset(config.data)
    device = config.resolved_device()
    model = build_experiment_model(config, dataset).to(device)
    train_loader = dataset.loader(
        "train", config.train.batch_size, shuffle=True, seed=derive_seed(config.seed, "data")
    ).to(device)
    eval_loader = dataset.loader("test", config.data.eval_batch_size).to(device)
    return Compression(
        model,
        config.compression,
        train_loader,
        eval_loader=eval_loader,
        train=config.train,
        seed=config.seed,
        progress=progress,
        log=log,
        mc_samples=config.eval.mc_samples,
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
        run = _compression(config, progress, get_run_logger().info)
        run.restore(path)
    run.context.log = get_run_logger().info  # this task's logger, not the one that built it
    return run


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(config: dict[str, Any], artifacts_dir: str, progress: bool = True) -> dict:
    """Train the deterministic model, or reuse the cached file for the same pretraining."""
    cfg = parse_config(config)
    path = ExperimentFiles.for_config(cfg, artifacts_dir).pretrained_model
    logger = get_run_logger()
    if is_complete_safetensors(path):
        header = read_checkpoint_header(path)
        logger.info("reusing cached pretraining %s (key %s)", path, pretrain_key(cfg))
        acc = header["test_metrics"]["cls/acc"]
        return {"path": str(path), "cached": True, "test_acc": acc, "seconds": 0.0}
    dataset = _dataset(cfg.data)
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


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(
    config: dict[str, Any], pretrained: dict, artifacts_dir: str, progress: bool = True
) -> dict:
    """Convert conv/linear layers to (mu, sigma) and initialise them for the method."""
    cfg = parse_config(config)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    run = _compression(cfg, progress, get_run_logger().info)
    load_checkpoint(Path(pretrained["path"]), run.model)
    report = run.convert()
    share_state(run)
    run.save(files.init, {"conversion": report.summary()})
    _remember(files.init, run)
    get_run_logger().info(report.summary())
    return {"path": str(files.init), "converted": report.num_converted, "left": report.num_left}


def _step_entry(step: Step, metrics: dict[str, float], table: pd.DataFrame) -> dict:
    return {
        "step": step.index,
        "stage": step.stage,
        "number": step.number,
        "of": step.of,
        "fraction": step.fraction,
        "metrics": metrics,
        "table": json.loads(table.to_json(orient="records")) if not table.empty else [],
    }


def step_history(path: Path) -> list[dict]:
    """What every step up to the checkpoint at ``path`` recorded, in order.

    Each step checkpoint carries the whole history in its header, so the last one alone is
    enough to resume, to rebuild the tables and to log what a crash kept from MLflow.
    """
    return read_checkpoint_header(path).get("history", [])


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
    history = step_history(Path(previous["path"]))
    record = run.run_step(index)
    path = files.step(index)
    entry = _step_entry(record.step, record.metrics, record.table)
    run.save(path, {**entry, "history": [*history, entry]})
    _remember(path, run)
    if not cfg.execution.keep_checkpoints:
        files.prune(index + 1)  # only after the new checkpoint is whole on disk
    return {"path": str(path), "label": label, "metrics": record.metrics}


@task(name="evaluate", cache_policy=NO_CACHE)
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
    dataset = _dataset(cfg.data)
    export = save_compressed(
        run.model,
        files.final / "model.pwf.safetensors",
        spec=model_spec(cfg, dataset),
        config=config_to_dict(cfg),
    )
    metrics |= export.as_metrics()
    headers = step_history(Path(last_step["path"]))
    steps = pd.DataFrame(
        [
            {
                "step": h["step"] + 1,
                "stage": h["stage"],
                "round": h["number"],
                "fraction": h["fraction"],
                **h["metrics"],
            }
            for h in headers
        ]
    )
    detail = pd.DataFrame([{"round": h["number"], **row} for h in headers for row in h["table"]])
    samples, average = run.method.prediction()
    seed_everything(derive_seed(cfg.seed, "final-eval"))
    log_probs, labels = predict_log_probs(
        run.model, run.context.eval_loader, run.context.device, samples, average
    )
    bins = reliability_bins(log_probs.exp(), labels)
    outputs = {
        "steps": files.final / "steps.parquet",
        "detail": files.final / "detail.parquet",
        "plot": files.final / "acc_vs_unique_values.png",
        "reliability": files.final / "reliability.png",
        "model": export.path,
    }
    for name, frame in (("steps", steps), ("detail", detail)):
        with atomic_path(outputs[name]) as tmp:
            frame.to_parquet(tmp, index=False)
    rounds = steps[steps["stage"] == "round"]
    if not rounds.empty:
        accuracy_vs_unique_values(rounds, outputs["plot"], title, pretrained_acc)
    else:
        del outputs["plot"]
    if sharing_of(run.model) is not None:
        outputs["mixture"] = gaussian_scatter(
            mixture_snapshot(run.model, seed=cfg.seed), files.final / "mixture.png", title
        )
    reliability_diagram(
        bins, outputs["reliability"], f"{title}\nECE {metrics.get('cal/ece', float('nan')):.4f}"
    )
    summary = {
        "metrics": metrics,
        "outputs": {k: str(v) for k, v in outputs.items()},
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(files.summary, json.dumps(summary, indent=2))
    get_run_logger().info(
        "final: top-1 %.2f %%, NLL %.4f, ECE %.4f, %d unique values, %s, %.1fx smaller than "
        "float32",
        100 * metrics["cls/acc"],
        metrics["cls/nll"],
        metrics["cal/ece"],
        metrics["ws/unique_values"],
        export.path.name,
        export.compression_ratio,
    )
    return summary


def _log_pretraining(tracker: RunTracker, pretrained: dict) -> None:
    header = read_checkpoint_header(Path(pretrained["path"]))
    curves = [("pretrain/loss", v, e) for e, v in enumerate(header["epoch_losses"], start=1)]
    curves += [("pretrain/val_acc", v, e) for e, v in enumerate(header["val_acc"], start=1)]
    curves += [
        (f"pretrain/test_{k.split('/')[-1]}", v, 0) for k, v in header["test_metrics"].items()
    ]
    tracker.log_series(curves)
    tracker.set_tags({"pretrain.cached": pretrained["cached"], "pretrain.path": pretrained["path"]})


def _log_missing_steps(tracker: RunTracker, history: list[dict]) -> None:
    """Log the steps a crash kept from MLflow (it can fall between a checkpoint and its log);
    a step that is already there is not logged again."""
    for entry in history:
        metrics = entry["metrics"]
        if metrics and entry["step"] + 1 not in tracker.logged_steps(next(iter(metrics))):
            tracker.log_metrics(metrics, step=entry["step"] + 1)


def _pretrained_acc(files: ExperimentFiles) -> float | None:
    if not is_complete_safetensors(files.pretrained_model):
        return None
    return read_checkpoint_header(files.pretrained_model)["test_metrics"]["cls/acc"]


def _artifact_key(config: ExperimentConfig) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", config.name.lower()).strip("-")[:40]
    return f"pwf-{slug}-{run_key(config)[:8]}"


def _markdown(title: str, tracker: RunTracker, rows: list[dict], final: dict) -> str:
    header = "| step | " + " | ".join(label for _, label, _ in TABLE_KEYS) + " |"
    lines = [
        f"### {title}",
        "",
        f"MLflow run: [{tracker.run_id}]({tracker.url})",
        "",
        header,
        "|" + " --- |" * (len(TABLE_KEYS) + 1),
    ]
    for row in rows:
        cells = [fmt(row[key]) if key in row else "" for key, _, fmt in TABLE_KEYS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**final**: top-1 {100 * final['cls/acc']:.2f} %, "
        f"{int(final['ws/unique_values'])} unique values, "
        f"ECE {final.get('cal/ece', float('nan')):.4f}, "
        f"{int(final.get('size/file_bytes', 0)):,} bytes",
    ]
    return "\n".join(lines)


def _description(config: ExperimentConfig, plan: list[Step]) -> str:
    return (
        f"{config.compression.method} on {config.model.name} / {config.data.name}, "
        f"{len(plan)} steps, seed {config.seed}; artifacts key {run_key(config)}"
    )


@flow(name="pwf-experiment", flow_run_name=_flow_run_name, log_prints=True)
def pwf_experiment(
    config: dict[str, Any] | None = None,
    artifacts_dir: str = "artifacts",
    parent_run_id: str | None = None,
    progress: bool = True,
    tags: dict[str, str] | None = None,
    run_name: str | None = None,
    fresh: bool = False,
    source: str = "pwf-experiment",
    trial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment and record it in MLflow.

    Args:
        config: Experiment config as a mapping (see :class:`~pwf_core.config.ExperimentConfig`);
            validated before anything runs.
        artifacts_dir: Root of checkpoints, the pretraining cache and final outputs.
        parent_run_id: MLflow run to nest this one under (a sweep's run).
        progress: Show progress bars while training.
        tags: Extra MLflow tags (a sweep marks its trials with them).
        run_name: MLflow run and Prefect flow-run name (default: method, model, data, hash).
        fresh: Start over even if this experiment finished or has checkpoints; its earlier
            MLflow run is left as it is.
        source: What launched the run (MLflow's ``mlflow.source.name``).
        trial: The sweep trial this run computes on a worker (``storage``, ``study``,
            ``number``, ``heartbeat_s``): the run keeps the trial's heartbeat, and does nothing
            when the trial is no longer running (its driver gave it up).

    Returns:
        The MLflow run id and URL, the experiment folder, the tracking URI, the final metrics
        and timings; ``already_complete`` when a finished run was found and left untouched.
    """
    cfg = parse_config(config or {})
    with owned_trial(trial) as running:
        if not running:
            get_run_logger().info(
                "trial %s of study %s is no longer running: nothing to do",
                trial["number"],
                trial["study"],
            )
            return {"superseded": True, "experiment": cfg.name}
        return _experiment(
            cfg, artifacts_dir, parent_run_id, progress, tags, run_name, fresh, source
        )


def _experiment(
    cfg: ExperimentConfig,
    artifacts_dir: str,
    parent_run_id: str | None,
    progress: bool,
    tags: dict[str, str] | None,
    run_name: str | None,
    fresh: bool,
    source: str,
) -> dict[str, Any]:
    set_infra_timeout(cfg.execution.infra_timeout_s)
    files = ExperimentFiles.for_config(cfg, artifacts_dir)
    with exclusive_run(files.lock_folder, f"'{cfg.name}' ({files.root})"):
        return _experiment_held(
            cfg, files, artifacts_dir, parent_run_id, progress, tags, run_name, fresh, source
        )


def _experiment_held(
    cfg: ExperimentConfig,
    files: ExperimentFiles,
    artifacts_dir: str,
    parent_run_id: str | None,
    progress: bool,
    tags: dict[str, str] | None,
    run_name: str | None,
    fresh: bool,
    source: str,
) -> dict[str, Any]:
    values = config_to_dict(cfg)
    logger = get_run_logger()
    name = run_name or default_run_name(cfg)
    if fresh:
        files.clear_outputs()
    done = finished_result(cfg, files)
    if done is not None:
        if tags:  # a retried sweep trial: its run now answers to the trial's new number
            tracker = RunTracker.reopened(cfg.name, done["run_id"])
            tracker.rename(name)
            tracker.set_tags(tags)
        logger.info(
            "experiment already complete, nothing changed: MLflow run %s (%s), artifacts %s; "
            "ask for a fresh run to start over",
            done["run_id"],
            done["url"],
            files.root,
        )
        return done
    plan = create_method(cfg.compression).plan()
    title = f"{cfg.name}: {name}"
    resume_id = files.mlflow_run_id.read_text().strip() if files.mlflow_run_id.is_file() else None
    run_tags = {
        **standard_tags(source, _description(cfg, plan)),
        "method": cfg.compression.method,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "run_key": run_key(cfg),
        "artifacts": str(files.root),
        **(tags or {}),
    }
    started = time.perf_counter()
    with tracked_run(cfg.name, name, run_tags, parent_run_id, resume_id) as tracker:
        write_text_atomic(files.mlflow_run_id, tracker.run_id)
        if not files.config.is_file():
            write_text_atomic(files.config, yaml.safe_dump(values, sort_keys=False))
        if flow_run.id:
            tracker.set_tags(
                {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name}
                | ({"prefect.flow_run_url": flow_run.ui_url} if flow_run.ui_url else {})
                | ({"prefect.task_run_id": task_run.id} if task_run.id else {})
            )
        logger.info("MLflow run %s: %s", tracker.run_id, tracker.url)
        if world_size() > 1:
            logger.info("training on %d processes (DDP); rank 0 fixes and logs", world_size())
            tracker.set_tags({"distributed.world_size": world_size()})
        tracker.log_params(flatten_config(cfg))
        compute_s = 0.0  # time in pwf_core (training, fixing, evaluation), not orchestration
        finished = files.finished_steps(len(plan), warn=logger.warning)
        history: list[dict] = []
        # Prefect links a task's inputs to the tasks whose results they are by the ids of the
        # results' parts; holding every result keeps a freed id from being reused by a later
        # object and linking a task to the wrong upstream one.
        results: list[dict] = []
        if finished == 0 and not is_complete_safetensors(files.init):
            pretrained = pretrain_task(values, artifacts_dir, progress)
            compute_s += pretrained["seconds"]
            _log_pretraining(tracker, pretrained)
            previous = prepare_task(values, pretrained, artifacts_dir, progress)
            results += [pretrained, previous]
        else:
            previous = {"path": str(files.resume_point(finished))}
            if finished:
                history = step_history(files.step(finished - 1))
                if not cfg.execution.keep_checkpoints:
                    files.prune(finished)  # a crash may have come before the old one went
                where = str(plan[finished]) if finished < len(plan) else "the final evaluation"
                logger.info("resuming %s at %s (MLflow run %s)", files.root, where, tracker.run_id)
                tracker.set_tags({"resumed_at": where})
        rows = [{"label": str(plan[entry["step"]]), **entry["metrics"]} for entry in history]
        _log_missing_steps(tracker, history)
        for step in plan[finished:]:
            previous = step_task(
                values,
                step.index,
                previous,
                artifacts_dir,
                str(step).replace("/", " of "),
                progress,
            )
            results.append(previous)
            metrics = previous["metrics"]
            tracker.log_metrics(metrics, step=step.index + 1)
            rows.append({"label": str(step), **metrics})
            compute_s += sum(
                metrics.get(k, 0.0) for k in ("time/train_s", "time/fix_s", "time/eval_s")
            )
        summary = evaluate_task(values, previous, artifacts_dir, _pretrained_acc(files), title)
        compute_s += summary["seconds"]
        tracker.log_metrics({f"final/{k}": v for k, v in summary["metrics"].items()})
        tracker.log_artifact(files.config)
        outputs = summary["outputs"]
        for key, folder in (
            ("steps", "tables"),
            ("detail", "tables"),
            ("plot", "plots"),
            ("reliability", "plots"),
            ("mixture", "plots"),
            ("model", "model"),
        ):
            if key in outputs:
                tracker.log_artifact(Path(outputs[key]), folder)
        timing = {"time/experiment_s": time.perf_counter() - started, "time/compute_s": compute_s}
        tracker.log_metrics(timing)
        if flow_run.id:
            create_markdown_artifact(
                _markdown(title, tracker, rows, summary["metrics"]),
                key=_artifact_key(cfg),
                description=f"{name}: per-step results and the MLflow run",
            )
    return {
        "run_id": tracker.run_id,
        "experiment": cfg.name,
        "artifacts": str(files.root),
        "tracking_uri": tracking_uri(),
        "url": tracker.url,
        "metrics": summary["metrics"],
        "timing": timing,
        "already_complete": False,
    }
