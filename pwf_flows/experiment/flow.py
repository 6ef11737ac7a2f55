"""The ``pwf-experiment`` flow: run (or resume) one experiment and record it in MLflow.

Each step task receives the previous task's result, so Prefect's graph is the real chain.
Pretraining is cached by what determines it, and every step writes a checkpoint: rerunning the
same command after a crash continues at the first unfinished step, in the same MLflow run. A
finished experiment is left untouched unless a fresh run is asked for. One process at a time
computes an experiment (:mod:`pwf_flows.run_lock`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run, task_run
from prefect.settings import PREFECT_UI_URL

from pwf_core._files import is_complete_safetensors, write_text_atomic
from pwf_core.checkpoint import read_checkpoint_header
from pwf_core.config import ExperimentConfig, config_to_dict, parse_config, recorded_params
from pwf_core.distributed import world_size
from pwf_core.methods import Method, Step, StepRecord
from pwf_core.registry import create_method
from pwf_flows.artifacts import ExperimentFiles, run_key, setting_key, usable_checkpoint
from pwf_flows.environment import configure_environment
from pwf_flows.experiment.summary import artifact_key, default_run_name, description, markdown
from pwf_flows.experiment.tasks import (
    evaluate_task,
    prepare_task,
    pretrain_task,
    step_history,
    step_task,
)
from pwf_flows.infra import set_infra_timeout
from pwf_flows.links import run_url
from pwf_flows.orphans import take_over_experiment
from pwf_flows.process_exit import end_quickly_if_flow_process
from pwf_flows.results import finished_result
from pwf_flows.run_lock import exclusive_run
from pwf_flows.sweep.early_stopping import RoundMonitor
from pwf_flows.sweep.trials import owned_trial
from pwf_flows.tracking import (
    RunTracker,
    note,
    standard_tags,
    tracked_run,
    tracking_uri,
)

COMPUTE_KEYS = ("time/train_s", "time/fix_s", "time/eval_s")  # pwf_core's time, not Prefect's
# Where each kind of output goes among the MLflow run's artifacts.
ARTIFACT_FOLDERS = {
    ".parquet": "tables",
    ".json": "tables",
    ".png": "plots",
    ".safetensors": "model",
    ".onnx": "model",
}


def _flow_run_name() -> str:
    parameters = flow_run.parameters
    if parameters.get("run_name"):
        return str(parameters["run_name"])
    try:
        return default_run_name(parse_config(parameters.get("config") or {}))
    except ValueError:
        return "pwf-experiment (invalid config)"


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
        trial: The sweep trial (and replicate) this run computes (``storage``, ``study``,
            ``number``, ``heartbeat_s``, ``heartbeat``, ``replicate``, ``objectives``,
            ``rule``): on a worker the run keeps the trial's heartbeat, and does nothing when
            the trial is no longer running (its driver gave it up); every step's point is
            recorded in the study, and the early-stopping ``rule`` may end the run there.

    Returns:
        The MLflow run id and URL, the experiment folder, the tracking URI, the final metrics
        and timings; ``already_complete`` when a finished run was found and left untouched;
        ``early_stopped`` (where, by which trials, the compute saved) when the sweep's rule
        stopped it, with the last step's metrics.
    """
    configure_environment()  # a worker's flow run starts here, not in the pwf command
    end_quickly_if_flow_process()
    cfg = parse_config(config or {})
    with owned_trial(trial) as running:
        if not running:
            get_run_logger().info(
                "trial %s of study %s is no longer running: nothing to do",
                trial["number"],
                trial["study"],
            )
            return {"superseded": True, "experiment": cfg.name}
        request = _Request(
            cfg,
            ExperimentFiles.for_config(cfg, artifacts_dir),
            artifacts_dir,
            parent_run_id,
            progress,
            tags or {},
            run_name or default_run_name(cfg),
            fresh,
            source,
            trial,
        )
        set_infra_timeout(cfg.execution.infra_timeout_s)
        with exclusive_run(request.files.lock_folder, f"'{cfg.name}' ({request.files.root})"):
            return _experiment(request)


@dataclass(frozen=True)
class _Request:
    """What one flow run was asked to do."""

    cfg: ExperimentConfig
    files: ExperimentFiles
    artifacts_dir: str
    parent_run_id: str | None
    progress: bool
    tags: dict[str, str]
    run_name: str
    fresh: bool
    source: str
    trial: dict[str, Any] | None = None

    @property
    def values(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)


def _experiment(request: _Request) -> dict[str, Any]:
    cfg, files = request.cfg, request.files
    crashed = take_over_experiment(files.root)
    if crashed:
        get_run_logger().info("marked CRASHED what a killed process left running: %s", crashed)
    if request.fresh:
        files.clear_outputs()
    done = finished_result(cfg, files)
    if done is not None:
        return _already_complete(request, done)
    method = create_method(cfg.compression)
    plan = method.plan()
    about = description(cfg, plan)
    title = f"{cfg.name}: {request.run_name}"
    started = time.perf_counter()
    with tracked_run(
        cfg.name, request.run_name, _tags(request, about), request.parent_run_id, _run_id(files)
    ) as tracker:
        _link(request, tracker, about)
        # Prefect links a task's inputs to the tasks whose results they are by the ids of the
        # results' parts; holding every result keeps a freed id from being reused by a later
        # object and linking a task to the wrong upstream one.
        results: list[dict] = []
        previous, records, compute_s = _start_or_resume(request, plan, tracker, results)
        monitor = RoundMonitor(request.trial, len(plan)) if request.trial is not None else None
        for step in plan[len(records) :]:
            previous = step_task(
                request.values,
                step.index,
                previous,
                request.artifacts_dir,
                str(step).replace("/", " of "),
                request.progress,
            )
            results.append(previous)
            records.append(StepRecord(step, previous["metrics"]))
            tracker.log_metrics(previous["metrics"], step=step.index + 1)
            compute_s += _step_compute(previous["metrics"])
            if monitor is not None:
                spent = sum(_step_compute(record.metrics) for record in records)
                decision = monitor.after_step(step.index, previous["metrics"], spent)
                if decision.stop:
                    return _stopped_early(
                        request, tracker, step, len(plan), decision.by, spent, compute_s, started
                    )
        summary = evaluate_task(
            request.values, previous, request.artifacts_dir, _pretrained_acc(files), title
        )
        compute_s += summary["seconds"]
        _record_results(tracker, files, summary)
        timing = {"time/experiment_s": time.perf_counter() - started, "time/compute_s": compute_s}
        tracker.log_metrics(timing)
        if flow_run.id:
            create_markdown_artifact(
                _table(title, method, tracker, records, summary["metrics"]),
                key=artifact_key(cfg),
                description=f"{request.run_name}: per-step results and the MLflow run",
            )
    return {
        "run_id": tracker.run_id,
        "experiment": cfg.name,
        "artifacts": str(files.root),
        "tracking_uri": tracking_uri(),
        "url": tracker.url,
        "prefect_url": prefect_task_url() or flow_run.ui_url,
        "metrics": summary["metrics"],
        "timing": timing,
        "already_complete": False,
    }


def _step_compute(metrics: dict[str, float]) -> float:
    return sum(metrics.get(key, 0.0) for key in COMPUTE_KEYS)


def _stopped_early(
    request: _Request,
    tracker: RunTracker,
    step: Step,
    steps: int,
    by: tuple[int, ...],
    spent_s: float,
    compute_s: float,
    started: float,
) -> dict[str, Any]:
    """End a sweep trial's run that early stopping stopped after ``step``: FINISHED, with a
    tag saying where and by which trials, its checkpoints removed (nobody resumes it), and
    the compute the rest of it would have cost (an estimate from its steps so far)."""
    whole_s = spent_s / (step.index + 1) * steps
    stopped = {
        "round": step.number,
        "step": str(step),
        "by": list(by),
        "saved_s": whole_s - spent_s,
        "whole_s": whole_s,
    }
    tracker.set_tags(
        {
            "early_stopped.round": str(step.index + 1),
            "early_stopped.step": str(step),
            "early_stopped.by": ", ".join(map(str, by)),
        }
    )
    timing = {"time/experiment_s": time.perf_counter() - started, "time/compute_s": compute_s}
    tracker.log_metrics(
        timing | {"early_stopped/saved_s": stopped["saved_s"], "early_stopped/whole_s": whole_s}
    )
    request.files.remove_checkpoints()
    write_text_atomic(request.files.early_stopped, json.dumps(stopped))
    get_run_logger().info(
        "stopped after %s: trials %s are better there in every objective; about %.0f s of "
        "compute saved",
        step,
        ", ".join(map(str, by)),
        stopped["saved_s"],
    )
    return {
        "run_id": tracker.run_id,
        "experiment": request.cfg.name,
        "artifacts": str(request.files.root),
        "tracking_uri": tracking_uri(),
        "url": tracker.url,
        "metrics": tracker.logged_metrics(),
        "timing": timing,
        "early_stopped": stopped,
        "already_complete": False,
    }


def _already_complete(request: _Request, done: dict[str, Any]) -> dict[str, Any]:
    """A finished experiment is left as it is; a retried sweep trial renames its run."""
    if request.tags:  # the run now answers to the trial's new number
        tracker = RunTracker.reopened(request.cfg.name, done["run_id"])
        tracker.rename(request.run_name)
        tracker.set_tags(request.tags)
    get_run_logger().info(
        "experiment already complete, nothing changed: MLflow run %s (%s), artifacts %s; "
        "ask for a fresh run to start over",
        done["run_id"],
        done["url"],
        request.files.root,
    )
    return done


def _run_id(files: ExperimentFiles) -> str | None:
    return files.mlflow_run_id.read_text().strip() if files.mlflow_run_id.is_file() else None


def _tags(request: _Request, about: str) -> dict[str, str]:
    cfg = request.cfg
    return {
        **standard_tags(request.source, about),
        "kind": "experiment",
        "method": cfg.compression.method,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "run_key": run_key(cfg),
        "setting": setting_key(cfg),
        "replicate": str(cfg.replicate.index),
        "artifacts": str(request.files.root),
        **request.tags,
    }


def prefect_task_url() -> str | None:
    """The Prefect UI's page of the task run this code runs in (a sweep's in-process trial)."""
    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/task-run/{task_run.id}" if base and task_run.id else None


def _link(request: _Request, tracker: RunTracker, about: str) -> None:
    """Tie the run to its folder and its Prefect runs, with clickable links in its
    description, and record its parameters."""
    files, logger = request.files, get_run_logger()
    write_text_atomic(files.mlflow_run_id, tracker.run_id)
    if not files.config.is_file():
        write_text_atomic(files.config, yaml.safe_dump(request.values, sort_keys=False))
    if flow_run.id:
        tracker.set_tags(
            {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name}
            | ({"prefect.flow_run_url": flow_run.ui_url} if flow_run.ui_url else {})
            | ({"prefect.task_run_id": task_run.id} if task_run.id else {})
        )
    links = {"Prefect flow run": flow_run.ui_url, "Prefect task run": prefect_task_url()}
    if request.parent_run_id:
        links["the sweep's run"] = run_url(tracker.experiment_id, request.parent_run_id)
    tracker.set_tags({"mlflow.note.content": note(about, links)})
    logger.info("MLflow run %s: %s", tracker.run_id, tracker.url)
    if world_size() > 1:
        logger.info("training on %d processes (DDP); rank 0 fixes and logs", world_size())
        tracker.set_tags({"distributed.world_size": world_size()})
    tracker.log_params(recorded_params(request.cfg))


def _start_or_resume(
    request: _Request, plan: list[Step], tracker: RunTracker, results: list[dict]
) -> tuple[dict, list[StepRecord], float]:
    """Where the steps start: after pretraining and conversion, or after the last finished
    step (whose history is logged where a crash kept it from MLflow).

    Args:
        results: Receives the results of the tasks run here (the caller holds them).

    Returns:
        The previous task's result, the records of the finished steps, compute seconds spent.
    """
    files, logger = request.files, get_run_logger()
    finished = files.finished_steps(len(plan), warn=logger.warning)
    if finished == 0 and not usable_checkpoint(files.init, logger.warning):
        pretrained = pretrain_task(request.values, request.artifacts_dir, request.progress)
        _log_pretraining(tracker, pretrained)
        prepared = prepare_task(request.values, pretrained, request.artifacts_dir, request.progress)
        results += [pretrained, prepared]
        return prepared, [], pretrained["seconds"]
    records: list[StepRecord] = []
    if finished:
        records = step_history(files.step(finished - 1))
        if not request.cfg.execution.keep_checkpoints:
            files.prune(finished)  # a crash may have come before the old one went
        where = str(plan[finished]) if finished < len(plan) else "the final evaluation"
        logger.info("resuming %s at %s (MLflow run %s)", files.root, where, tracker.run_id)
        tracker.set_tags({"resumed_at": where})
        _log_missing_steps(tracker, records)
    return {"path": str(files.resume_point(finished))}, records, 0.0


def _log_pretraining(tracker: RunTracker, pretrained: dict) -> None:
    header = read_checkpoint_header(Path(pretrained["path"]))
    curves = [("pretrain/loss", v, e) for e, v in enumerate(header["epoch_losses"], start=1)]
    curves += [("pretrain/val_acc", v, e) for e, v in enumerate(header["val_acc"], start=1)]
    curves += [
        (f"pretrain/test_{k.split('/')[-1]}", v, 0) for k, v in header["test_metrics"].items()
    ]
    tracker.log_series(curves)
    tracker.set_tags({"pretrain.cached": pretrained["cached"], "pretrain.path": pretrained["path"]})


def _log_missing_steps(tracker: RunTracker, records: list[StepRecord]) -> None:
    """Log the steps a crash kept from MLflow (it can fall between a checkpoint and its log);
    the tracker leaves out whatever is there already."""
    for record in records:
        tracker.log_metrics(record.metrics, step=record.step.index + 1)


def _pretrained_acc(files: ExperimentFiles) -> float | None:
    if not is_complete_safetensors(files.pretrained_model):
        return None
    return read_checkpoint_header(files.pretrained_model)["test_metrics"]["cls/acc"]


def _record_results(tracker: RunTracker, files: ExperimentFiles, summary: dict) -> None:
    tracker.log_metrics({f"final/{k}": v for k, v in summary["metrics"].items()})
    # the size knobs as the run resolved them (b=5 where the config said auto)
    tracker.log_params({f"knob.{k}": v for k, v in summary.get("knobs", {}).items()})
    tracker.log_artifact(files.config)
    for path in map(Path, summary["outputs"].values()):
        tracker.log_artifact(path, ARTIFACT_FOLDERS[path.suffix])
        if path.suffix == ".png":  # also an image, which MLflow's compare view shows
            tracker.log_image(path, key=path.stem)


def _table(
    title: str, method: Method, tracker: RunTracker, records: list[StepRecord], final: dict
) -> str:
    rows = [{"label": str(record.step), **record.metrics} for record in records]
    return markdown(title, method, tracker.run_id, tracker.url, rows, final)
