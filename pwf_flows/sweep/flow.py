"""The ``pwf`` flow: run (or continue) the Optuna study a sweep file describes.

MLflow: one parent run per sweep, every trial a nested child run named by its number and
parameters. Optuna trials carry their MLflow run id; the study names its objectives. A sweep
that already has its ``n_trials`` complete trials and its report is left as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from pwf_core._files import file_lock, write_text_atomic
from pwf_core.errors import ConfigError
from pwf_flows.environment import configure_environment
from pwf_flows.infra import set_infra_timeout
from pwf_flows.orphans import release, take_over_sweep
from pwf_flows.process_exit import end_quickly_if_flow_process
from pwf_flows.sweep.driver import Driver
from pwf_flows.sweep.notes import describe_sweep
from pwf_flows.sweep.pool import PoolRunner
from pwf_flows.sweep.report import method_label, report_sweep, trials_table
from pwf_flows.sweep.spec import SweepSpec, dump_spec, load_sweep, masked_url, sweep_name
from pwf_flows.sweep.study import TRIAL_TAG, open_study, trials_done, trials_in
from pwf_flows.tracking import (
    RunTracker,
    experiment_id,
    find_run,
    retried,
    tracked_run,
)
from pwf_flows.tracking import client as mlflow_client


def _run_name() -> str:
    """``sweep-<name>``: the study's name, as an override (``--set name=...``) or the file
    gives it, which is also its MLflow experiment's."""
    parameters = flow_run.parameters
    path = Path(str(parameters.get("sweep", "sweep")))
    name = (parameters.get("overrides") or {}).get("name")
    if name is None:
        try:
            name = sweep_name(path)
        except ConfigError:
            name = path.stem
    return f"sweep-{name}"


@flow(name="pwf", flow_run_name=_run_name, log_prints=True)
def pwf(
    sweep: str = "sweeps/full-sweep.yaml",
    overrides: dict[str, Any] | None = None,
    trial_deployment: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the Optuna study a sweep file describes.

    Args:
        sweep: Sweep YAML, relative to the working directory (the project on a worker).
        overrides: Dotted keys replacing sweep fields, e.g. ``{"study.n_trials": 3}``.
        trial_deployment: Run trials as runs of this deployment (``pwf-experiment/gpu``)
            instead of in this process.
        progress: Progress bars in the trials.

    Returns:
        The study name, trial counts, timing, the MLflow parent run, and the Pareto front.
    """
    configure_environment()  # a worker's flow run starts here, not in the pwf command
    end_quickly_if_flow_process()
    spec = load_sweep(sweep, overrides)
    set_infra_timeout(spec.infra_timeout_s)
    logger = get_run_logger()
    study = open_study(spec)
    logger.info(
        "study '%s' in %s: %d trials so far, %d wanted complete",
        spec.name,
        masked_url(spec.study.resolved_storage()),
        len(study.get_trials(deepcopy=False)),
        spec.n_trials,
    )
    folder = Path(spec.execution.artifacts_dir).resolve() / "sweeps" / spec.name
    record, crashed = take_over_sweep(folder)
    if crashed:
        logger.info("marked CRASHED what a killed driver left running: %s", crashed)
    try:
        return _sweep(spec, study, folder, trial_deployment, progress)
    finally:
        release(record)


def _sweep(
    spec: SweepSpec,
    study: optuna.Study,
    folder: Path,
    trial_deployment: str | None,
    progress: bool,
) -> dict[str, Any]:
    """The sweep's body: its parent run, the trials, the report."""
    logger = get_run_logger()
    run_name = f"sweep-{spec.name}"
    tags = {"kind": "sweep", "sampler": spec.sampler, "optuna.study": spec.name}
    parent_id = _parent_run(study, spec, folder, run_name, tags)
    done = _finished_sweep(study, spec, parent_id)
    if done is not None:
        logger.info(
            "sweep %s already has its %d complete trials and its report: nothing changed "
            "(MLflow run %s); raise study.n_trials to continue it",
            spec.name,
            done["complete_trials"],
            parent_id,
        )
        return done
    started = time.perf_counter()
    deadline = time.time() + spec.study.timeout_s if spec.study.timeout_s else None
    if flow_run.id:
        tags["prefect.last_flow_run_id"] = flow_run.id
    with tracked_run(spec.name, run_name, tags, resume_run_id=parent_id) as parent:
        _start_parent(parent, study, spec, folder)
        earlier = parent.logged_metrics()
        driver = Driver(study, spec, parent.run_id, progress, folder)
        if trial_deployment:
            PoolRunner(driver, trial_deployment).run(deadline)
        else:
            driver.run_in_process(deadline)
        with file_lock(folder / ".parent.lock"):  # drivers sharing the study log in turn
            table = report_sweep(study, spec, parent, folder)
            runs = [] if table.empty else table["mlflow_run_id"].dropna().tolist()
            describe_sweep(parent, study, spec, _about(spec), runs)  # now with the comparison
            timing = _timing(earlier, time.perf_counter() - started, driver)
            parent.log_latest(timing)  # totals over every session that worked on the sweep
    logger.info(
        "sweep %s: %d complete trials, Pareto front:\n%s",
        spec.name,
        len(table),
        table[table["pareto"]].to_string(index=False) if not table.empty else "(empty)",
    )
    return _sweep_result(spec, table, parent.run_id, parent.url, timing)


def _parent_run(
    study: optuna.Study, spec: SweepSpec, folder: Path, run_name: str, tags: dict[str, str]
) -> str:
    """The sweep's parent MLflow run: the study's, or a new one (created with this flow run's
    Prefect id). Drivers started together share one: creating it is serialised."""
    with file_lock(folder / ".parent.lock"):
        parent_id = study.user_attrs.get("mlflow_run_id")
        if parent_id is None or find_run(spec.name, parent_id) is None:
            created = tags | ({"prefect.flow_run_id": flow_run.id} if flow_run.id else {})
            parent_id = RunTracker.open(spec.name, run_name, created).run_id
            study.set_user_attr("mlflow_run_id", parent_id)
    return parent_id


def _start_parent(parent: RunTracker, study: optuna.Study, spec: SweepSpec, folder: Path) -> None:
    """Record the sweep's settings and file on its parent run, and close what a stopped driver
    left RUNNING."""
    parent.log_params(
        {
            "sweep.n_trials": spec.n_trials,
            "sweep.sampler": spec.sampler,
            "sweep.objectives": ",".join(spec.study.objectives),
            "sweep.space": json.dumps(sorted(spec.space)),
            "sweep.base": spec.base.name,
        }
    )
    with file_lock(folder / ".parent.lock"):  # drivers sharing the study write its note in turn
        describe_sweep(parent, study, spec, _about(spec))
    closed = close_orphaned_runs(study, spec.name, parent.run_id)
    if closed:
        get_run_logger().info("closed MLflow runs left RUNNING by a stopped driver: %s", closed)
    write_text_atomic(folder / "sweep.yaml", dump_spec(spec))
    parent.log_artifact(folder / "sweep.yaml")


def _about(spec: SweepSpec) -> str:
    return (
        f"sweep {spec.name}: {spec.n_trials} trials of {method_label(spec)} on "
        f"{spec.base.name} ({spec.sampler}); Optuna study '{spec.name}'"
    )


def _timing(earlier: dict[str, float], wall_s: float, driver: Driver) -> dict[str, float]:
    """The sweep's timings over every session that worked on it (a continued sweep adds), and
    what early stopping saved (an estimate: the stopped trials' remaining rounds)."""
    wall = earlier.get("sweep/wall_s", 0.0) + wall_s
    compute = earlier.get("sweep/compute_s", 0.0) + driver.compute_s
    return {
        "sweep/wall_s": wall,
        "sweep/compute_s": compute,
        "sweep/orchestration_s": wall - compute,
        "sweep/early_stopped": earlier.get("sweep/early_stopped", 0.0) + driver.stopped_early,
        "sweep/saved_s": earlier.get("sweep/saved_s", 0.0) + driver.saved_s,
    }


def _sweep_result(
    spec: SweepSpec, table: pd.DataFrame, run_id: str, url: str, timing: dict[str, float]
) -> dict[str, Any]:
    return {
        "study": spec.name,
        "complete_trials": len(table),
        "mlflow_run_id": run_id,
        "url": url,
        "timing": timing,
        "pareto": table[table["pareto"]].to_dict(orient="records") if not table.empty else [],
        "already_complete": False,
    }


def _finished_sweep(study: optuna.Study, spec: SweepSpec, parent_id: str) -> dict | None:
    """The result of a sweep that is done and reported, else ``None``.

    Done: ``n_trials`` trials done (complete, or stopped early), none running, and a FINISHED
    parent run whose report counted the complete ones. Such a sweep is left as it is, timings
    and links included.
    """
    complete = trials_in(study, TrialState.COMPLETE)
    if len(trials_done(study)) < spec.n_trials or trials_in(
        study, TrialState.RUNNING, TrialState.WAITING
    ):
        return None
    parent = find_run(spec.name, parent_id)
    if parent is None or parent.info.status != "FINISHED":
        return None
    metrics = parent.data.metrics
    if metrics.get("sweep/complete_trials") != float(len(complete)):
        return None
    tracker = RunTracker.reopened(spec.name, parent_id)
    kept = ("sweep/wall_s", "sweep/compute_s", "sweep/early_stopped", "sweep/saved_s")
    timing = {k: v for k, v in metrics.items() if k in kept}
    timing["sweep/orchestration_s"] = timing.get("sweep/wall_s", 0.0) - timing.get(
        "sweep/compute_s", 0.0
    )
    return _sweep_result(spec, trials_table(study), parent_id, tracker.url, timing) | {
        "already_complete": True
    }


def close_orphaned_runs(study: optuna.Study, experiment: str, parent_run_id: str) -> list[str]:
    """End the trial runs a stopped driver left RUNNING (FINISHED if their trial completed),
    replicates' runs under a trial's run included.

    A trial that is still running (this study's heartbeats say so) keeps its runs; a trial
    that is queued again reopens its runs when it runs, whatever their status now.
    """
    client = mlflow_client()
    running = f"tags.sweep = '{experiment}' and attributes.status = 'RUNNING'"
    runs = retried(
        lambda: client.search_runs([experiment_id(client, experiment)], filter_string=running),
        "search runs",
    )
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = []
    for run in runs:
        if run.info.run_id == parent_run_id:
            continue
        number = run.data.tags.get(TRIAL_TAG)
        state = states.get(int(number)) if number is not None and number.isdigit() else None
        if state == TrialState.RUNNING:
            continue
        status = "FINISHED" if state in (TrialState.COMPLETE, TrialState.PRUNED) else "FAILED"
        RunTracker(run.info.run_id, run.info.experiment_id, client).finish(status)
        closed.append(run.info.run_id)
    return closed
