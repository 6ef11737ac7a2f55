"""The ``pwf`` flow: an Optuna study whose trials are ``pwf-experiment`` runs.

Ask → run the trial → tell. Trials run in-process (the embedded default: each is a subflow) or,
given ``trial_deployment`` (e.g. ``pwf-experiment/gpu``), as deployment runs on a work pool with
up to ``execution.max_parallel`` in flight: one per GPU worker. The study lives in Optuna's
storage, so rerunning the same sweep continues it; trials a crash left RUNNING are marked failed
and their parameters queued again (their experiments resume from their round checkpoints).

MLflow: one parent run per sweep (in the MLflow experiment named after the sweep), every trial a
nested child run; the parent holds the trials table with the Pareto front (parquet), a plot of
accuracy against unique values with the front highlighted, and parameter importances.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.samplers import BaseSampler, GridSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, Trial, TrialState
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.experiment import pwf_experiment
from flows.plots import bar_chart, pareto_front
from flows.sweep_spec import SweepSpec, dump_spec, load_sweep
from flows.tracking import RunTracker, experiment_id
from pwf_core.checkpoint import atomic_path, write_text_atomic
from pwf_core.config import ExperimentConfig, config_to_dict

TRIAL_TAG = "sweep.trial"
POLL_SECONDS = 2.0
REPORTED = {"accuracy": "cls/acc", "unique_values": "ws/unique_values"}


def _sampler(spec: SweepSpec) -> BaseSampler:
    seed = spec.study.seed
    if spec.sampler == "grid":
        return GridSampler(spec.grid(), seed=seed)
    if spec.sampler == "nsga2":
        return NSGAIISampler(seed=seed)
    if spec.sampler == "random":
        return RandomSampler(seed=seed)
    return TPESampler(seed=seed)


def open_study(spec: SweepSpec) -> optuna.Study:
    """Create the study, or load it to continue (same name and storage)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=spec.name,
        storage=spec.study.resolved_storage(),
        directions=spec.study.directions,
        sampler=_sampler(spec),
        load_if_exists=True,
    )


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a crash as failed and queue their parameters again."""
    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in interrupted:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
    return [t.number for t in interrupted]


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def suggest(trial: Trial, spec: SweepSpec) -> ExperimentConfig:
    """Draw the trial's values from the space and build its experiment config."""
    for key, dim in spec.space.items():
        if dim.choices is not None:
            trial.suggest_categorical(key, dim.labels())
        elif dim.int_range is not None:
            step = int(dim.step or 1)
            trial.suggest_int(key, *dim.int_range, step=step, log=dim.log)
        else:
            trial.suggest_float(key, *dim.float_range, step=dim.step, log=dim.log)  # type: ignore[misc]
    return spec.trial_config(trial.params)


def _tell(study: optuna.Study, spec: SweepSpec, trial: Trial, metrics: dict) -> None:
    """Report the objectives; accuracy and unique values are kept for the report either way."""
    for name, key in REPORTED.items():
        trial.set_user_attr(name, float(metrics[key]))
    study.tell(trial, [float(metrics[key]) for key in spec.study.metric_keys])


def _child_metrics(experiment: str, parent_run_id: str, number: int) -> dict[str, float]:
    """Final metrics of trial ``number`` as its run logged them (for trials run elsewhere)."""
    client = MlflowClient()
    runs = client.search_runs(
        [experiment_id(client, experiment)],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{number}'"
        ),
    )
    if not runs:
        raise RuntimeError(f"trial {number} left no MLflow run under {parent_run_id}")
    final = runs[0].data.metrics
    return {k.removeprefix("final/"): v for k, v in final.items() if k.startswith("final/")} | {
        k: v for k, v in final.items() if k.startswith("time/")
    }


def _trial_parameters(spec: SweepSpec, config: ExperimentConfig, parent: str, number: int):
    return {
        "config": config_to_dict(config),
        "artifacts_dir": spec.execution.artifacts_dir,
        "parent_run_id": parent,
        "progress": False,
        "tags": {TRIAL_TAG: str(number)},
    }


def _run_in_process(study, spec: SweepSpec, parent: RunTracker, deadline: float | None) -> float:
    """Trials one after another in this process; returns their compute seconds."""
    logger = get_run_logger()
    compute, failures = 0.0, 0
    while len(complete_trials(study)) < spec.n_trials and (
        deadline is None or time.time() < deadline
    ):
        trial = study.ask()
        config = suggest(trial, spec)
        logger.info("trial %d: %s", trial.number, trial.params)
        try:
            result = pwf_experiment(**_trial_parameters(spec, config, parent.run_id, trial.number))
        except Exception as err:  # a failed trial is recorded, the sweep goes on
            logger.warning("trial %d failed: %s", trial.number, err)
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            if failures > spec.n_trials:
                raise RuntimeError(
                    f"more failed trials ({failures}) than trials asked for"
                ) from err
            continue
        compute += result["timing"]["time/compute_s"]
        _tell(study, spec, trial, result["metrics"])
    return compute


def _run_on_pool(
    study, spec: SweepSpec, parent: RunTracker, deployment: str, deadline: float | None
) -> float:
    """Trials as deployment runs, ``max_parallel`` in flight; returns their compute seconds."""
    logger = get_run_logger()
    in_flight: dict[Any, Trial] = {}
    compute, failures = 0.0, 0
    with get_client(sync_client=True) as client:
        while True:
            wanted = spec.n_trials - len(complete_trials(study)) - len(in_flight)
            open_slots = spec.execution.max_parallel - len(in_flight)
            while wanted > 0 and open_slots > 0 and (deadline is None or time.time() < deadline):
                trial = study.ask()
                config = suggest(trial, spec)
                run = run_deployment(
                    deployment,
                    parameters=_trial_parameters(spec, config, parent.run_id, trial.number),
                    flow_run_name=f"{spec.name}-trial-{trial.number}",
                    timeout=0,
                )
                logger.info(
                    "trial %d submitted as flow run %s: %s", trial.number, run.id, trial.params
                )
                in_flight[run.id] = trial
                wanted, open_slots = wanted - 1, open_slots - 1
            if not in_flight:
                return compute
            time.sleep(POLL_SECONDS)
            for run_id, trial in list(in_flight.items()):
                state = client.read_flow_run(run_id).state
                if state is None or not state.is_final():
                    continue
                del in_flight[run_id]
                if state.is_completed():
                    metrics = _child_metrics(spec.name, parent.run_id, trial.number)
                    compute += metrics.get("time/compute_s", 0.0)
                    _tell(study, spec, trial, metrics)
                    logger.info(
                        "trial %d done: %s",
                        trial.number,
                        {k: metrics[v] for k, v in REPORTED.items()},
                    )
                else:
                    logger.warning("trial %d ended %s", trial.number, state.type.value)
                    study.tell(trial, state=TrialState.FAIL)
                    failures += 1
                    if failures > spec.n_trials:
                        raise RuntimeError(f"more failed trials ({failures}) than trials asked for")


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial: its parameters, accuracy, unique values, Pareto membership."""
    front = {t.number for t in study.best_trials}
    rows = [
        {
            "trial": t.number,
            **{f"param.{k}": v for k, v in t.params.items()},
            **{name: t.user_attrs.get(name) for name in REPORTED},
            "pareto": t.number in front,
        }
        for t in complete_trials(study)
    ]
    return pd.DataFrame(rows)


def _importances(study: optuna.Study, spec: SweepSpec) -> dict[str, dict[str, float]]:
    found = {}
    for index, name in enumerate(spec.study.objectives):
        try:
            found[name] = optuna.importance.get_param_importances(
                study, target=lambda t, i=index: t.values[i]
            )
        except (RuntimeError, ValueError, ZeroDivisionError) as err:
            get_run_logger().info("no parameter importances for %s: %s", name, err)
    return found


def _report(study: optuna.Study, spec: SweepSpec, parent: RunTracker, folder: Path) -> pd.DataFrame:
    table = trials_table(study)
    tables = folder / "trials.parquet"
    with atomic_path(tables) as tmp:
        table.to_parquet(tmp, index=False)
    parent.log_artifact(tables, "tables")
    if not table.empty:
        plot = pareto_front(table, folder / "pareto_front.png", f"{spec.name}: {len(table)} trials")
        parent.log_artifact(plot, "plots")
    for name, values in _importances(study, spec).items():
        path = bar_chart(values, folder / f"importance_{name}.png", f"parameter importance: {name}")
        parent.log_artifact(path, "plots")
    return table


def _run_name() -> str:
    return f"sweep-{Path(str(flow_run.parameters.get('sweep', 'sweep'))).stem}"


@flow(name="pwf", flow_run_name=_run_name, log_prints=True)
def pwf(
    sweep: str = "sweeps/full-sweep.yaml",
    overrides: dict[str, Any] | None = None,
    trial_deployment: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the Optuna study a sweep file describes.

    Args:
        sweep: Sweep YAML, relative to the working directory (the project on a worker).
        overrides: Dotted keys replacing sweep fields, e.g. ``{"study.n_trials": 3}``.
        trial_deployment: Run trials as runs of this deployment (``pwf-experiment/gpu``)
            instead of in this process.

    Returns:
        The study name, trial counts, timing, and the Pareto front rows.
    """
    spec = load_sweep(sweep, overrides)
    logger = get_run_logger()
    study = open_study(spec)
    requeued = requeue_interrupted(study)
    if requeued:
        logger.info("trials %s were interrupted: marked failed and queued again", requeued)
    parent = RunTracker.start(
        spec.name,
        f"sweep-{spec.name}",
        tags={"kind": "sweep", "sampler": spec.sampler},
        resume_run_id=study.user_attrs.get("mlflow_run_id"),
    )
    study.set_user_attr("mlflow_run_id", parent.run_id)
    started = time.perf_counter()
    deadline = time.time() + spec.study.timeout_s if spec.study.timeout_s else None
    try:
        parent.log_params(
            {
                "sweep.n_trials": spec.n_trials,
                "sweep.sampler": spec.sampler,
                "sweep.objectives": ",".join(spec.study.objectives),
                "sweep.space": json.dumps(sorted(spec.space)),
                "sweep.base": spec.base.name,
            }
        )
        folder = Path(spec.execution.artifacts_dir).resolve() / "sweeps" / spec.name
        write_text_atomic(folder / "sweep.yaml", dump_spec(spec))
        parent.log_artifact(folder / "sweep.yaml")
        if trial_deployment:
            compute = _run_on_pool(study, spec, parent, trial_deployment, deadline)
        else:
            compute = _run_in_process(study, spec, parent, deadline)
        table = _report(study, spec, parent, folder)
        wall = time.perf_counter() - started
        timing = {
            "sweep/wall_s": wall,
            "sweep/compute_s": compute,
            "sweep/orchestration_s": wall - compute,
        }
        parent.log_metrics(timing | {"sweep/complete_trials": len(table)})
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED")
    logger.info(
        "sweep %s: %d complete trials, Pareto front:\n%s",
        spec.name,
        len(table),
        table[table["pareto"]].to_string(index=False) if not table.empty else "(empty)",
    )
    return {
        "study": spec.name,
        "complete_trials": len(table),
        "mlflow_run_id": parent.run_id,
        "timing": timing,
        "pareto": table[table["pareto"]].to_dict(orient="records") if not table.empty else [],
    }


def pareto_report(spec: SweepSpec) -> pd.DataFrame:
    """The study's complete trials with the Pareto front marked (read-only)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec.name, storage=spec.study.resolved_storage())
    return trials_table(study)
