"""The ``pwf`` flow: an Optuna study whose trials are ``pwf-experiment`` runs.

Ask → run the trial → tell. Trials run in-process (the embedded default: each is a subflow) or,
given ``trial_deployment`` (e.g. ``pwf-experiment/gpu``), as deployment runs on a work pool with
up to ``execution.max_parallel`` in flight: one per GPU worker.

The study lives in Optuna's storage, so rerunning a sweep continues it, and several drivers may
work on one study at once:
- the sampler is seeded from the study's seed and its trial count, so a continued sweep asks
  new points instead of repeating the first ones; a configuration that is already complete (or
  running) is skipped, never counted twice;
- every running trial has a heartbeat from the process that owns it; only a trial whose
  heartbeat stopped is failed and retried (with the same parameters, so its experiment resumes
  from its checkpoints), never another live driver's;
- a driver that finds a trial whose deployment run is still going on a worker adopts it and
  waits for it instead of starting a duplicate;
- a driver starts a trial only while complete + running trials are fewer than ``n_trials``.

MLflow: one parent run per sweep, every trial a nested child run named by its number and
parameters. Optuna trials carry their MLflow run id; the study names its objectives.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler, GridSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Crashed

from pwf_core._files import atomic_path, file_lock, write_text_atomic
from pwf_core._seeding import derive_seed
from pwf_core.config import ExperimentConfig, config_to_dict
from pwf_flows.experiment import pwf_experiment
from pwf_flows.infra import InfraUnavailable, is_interrupt, set_infra_timeout
from pwf_flows.plots import bar_chart, pareto_front
from pwf_flows.sweep_spec import OBJECTIVES, SweepSpec, dump_spec, load_sweep, masked_url
from pwf_flows.tracking import RunTracker, experiment_id, find_run, retried, tracked_run
from pwf_flows.tracking import client as mlflow_client
from pwf_flows.trials import Heartbeats, fail_stale, quiet_optuna, requeue, storage_for

TRIAL_TAG = "sweep.trial"
POLL_SECONDS = 2.0
REPORTED = {
    "accuracy": "cls/acc",
    "unique_values": "ws/unique_values",
    "nll": "cls/nll",
    "ece": "cal/ece",
}
MIN_IMPORTANCE_TRIALS = 5
MAX_RETRIES = 3
DROP_TOLERANCE = 0.01  # "smallest unique count at <= 1 point drop"


class SweepGridSampler(GridSampler):
    """Optuna's grid sampler for ask-and-tell: it does not stop the study.

    ``GridSampler`` stops the study from ``after_trial`` once the grid is used up, and
    ``Study.stop`` raises outside ``optimize``: the ``tell`` of the last grid point crashed the
    sweep. The driver decides when a sweep is done (``n_trials`` complete trials), so there is
    nothing to stop.
    """

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[override]
        return None


def sampler_for(spec: SweepSpec, trials_so_far: int) -> BaseSampler:
    """The spec's sampler, seeded from the study seed and how many trials the study holds.

    Rebuilt with the bare seed on every start, a continued sweep would ask the very points it
    asked the first time.
    """
    seed = derive_seed(spec.study.seed, "sampler", trials_so_far)
    if spec.sampler == "grid":
        return SweepGridSampler(spec.grid(), seed=seed)
    if spec.sampler == "nsga2":
        return NSGAIISampler(seed=seed)
    if spec.sampler == "random":
        return RandomSampler(seed=seed)
    return TPESampler(seed=seed)


def open_study(spec: SweepSpec) -> optuna.Study:
    """Create the study, or load it to continue (same name and storage)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(spec.study.resolved_storage(), spec.study.heartbeat_s)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        directions=spec.study.directions,
        load_if_exists=True,
    )
    study.sampler = sampler_for(spec, len(study.get_trials(deepcopy=False)))
    with quiet_optuna():
        study.set_metric_names([OBJECTIVES[name].label for name in spec.study.objectives])
    return study


@task(name="trial", cache_policy=NO_CACHE, task_run_name="{run_name}")
def trial_task(parameters: dict[str, Any], run_name: str) -> dict[str, Any]:
    """An in-process trial: the experiment flow's body, its tasks nested under this one.

    A subflow per trial would cost about half a second of Prefect bookkeeping each (a flow
    run created, its states, its logs); a task named after the trial shows the same in the
    sweep's flow run. Trials on a work pool are flow runs of ``pwf-experiment/gpu``.
    """
    return pwf_experiment.fn(**parameters)


def trials_in(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def objective_values(spec: SweepSpec, metrics: dict[str, float]) -> list[float]:
    """The trial's values in the order of the study's objectives (and directions)."""
    return [float(metrics[key]) for key in spec.study.metric_keys]


def tell(study: optuna.Study, spec: SweepSpec, number: int, result: dict[str, Any]) -> None:
    """Report a finished trial: its objective values, and what the report and links need."""
    metrics = result["metrics"]
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    for name, key in REPORTED.items():
        if key in metrics:
            study._storage.set_trial_user_attr(trial_id, name, float(metrics[key]))
    for key in ("mlflow_run_id", "pretrained_accuracy"):
        if result.get(key) is not None:
            study._storage.set_trial_user_attr(trial_id, key, result[key])
    study.tell(number, objective_values(spec, metrics))


def suggest(trial: optuna.Trial, spec: SweepSpec) -> ExperimentConfig:
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


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_run_name(number: int, params: dict[str, Any]) -> str:
    """``trial-3 reg=0.00123, b=5``: the trial's number and what it tried."""
    described = ", ".join(f"{key.split('.')[-1]}={_short(v)}" for key, v in params.items())
    return f"trial-{number} {described}".strip()


def _duplicate_of(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of a complete or running trial with the same parameters, if any."""
    for other in trials_in(study, TrialState.COMPLETE, TrialState.RUNNING):
        if other.number != trial.number and other.params == trial.params:
            return other.number
    return None


class Driver:
    """One sweep process: asks, runs (here or on a pool), tells, and reports progress."""

    def __init__(self, study: optuna.Study, spec: SweepSpec, parent_run_id: str, progress: bool):
        self.study, self.spec = study, spec
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.logger = get_run_logger()
        self.compute_s = 0.0
        self.failures = 0
        self.skipped = 0
        self.heartbeats: Heartbeats | None = None

    def fail_stale(self) -> list[int]:
        """Fail and queue again the trials of drivers or workers that died (never ours)."""
        return fail_stale(self.study, self.heartbeats.owned() if self.heartbeats else set())

    def counts(self) -> tuple[int, int]:
        complete = len(trials_in(self.study, TrialState.COMPLETE))
        running = len(trials_in(self.study, TrialState.RUNNING))
        return complete, running

    def next_trial(self, heartbeats: Heartbeats) -> tuple[optuna.Trial, ExperimentConfig] | None:
        """Ask for a new configuration; ``None`` when the study has enough trials under way."""
        while True:
            complete, running = self.counts()
            if complete + running >= self.spec.n_trials:
                return None
            with quiet_optuna():
                trial = self.study.ask()
            heartbeats.own(trial._trial_id)
            config = suggest(trial, self.spec)
            complete, running = self.counts()
            earlier_running = [
                t for t in trials_in(self.study, TrialState.RUNNING) if t.number < trial.number
            ]
            if complete + len(earlier_running) >= self.spec.n_trials:
                self._drop(trial, heartbeats, "surplus", "another driver took the last slot")
                return None
            duplicate = _duplicate_of(self.study, trial)
            if duplicate is None:
                return trial, config
            self._drop(trial, heartbeats, "duplicate_of", duplicate)
            self.skipped += 1
            if self.skipped > 10 * max(self.spec.n_trials, 10):
                raise RuntimeError(
                    f"the sampler keeps proposing configurations that already ran "
                    f"({self.skipped} skipped): the search space has nothing new left"
                )

    def _drop(self, trial: optuna.Trial, heartbeats: Heartbeats, key: str, value: Any) -> None:
        trial.set_user_attr(key, value)
        self.study.tell(trial, state=TrialState.PRUNED)
        heartbeats.release(trial._trial_id)
        if key == "duplicate_of":
            self.logger.info("trial %d repeats trial %s: skipped", trial.number, value)

    def parameters(self, number: int, params: dict, config: ExperimentConfig) -> dict:
        return {
            "config": config_to_dict(config),
            "artifacts_dir": self.spec.execution.artifacts_dir,
            "parent_run_id": self.parent_run_id,
            "progress": self.progress,
            "tags": {TRIAL_TAG: str(number), "sweep": self.spec.name},
            "run_name": trial_run_name(number, params),
            "source": f"pwf sweep {self.spec.name}",
        }

    def record(self, number: int, result: dict[str, Any]) -> None:
        metrics = result["metrics"]
        self.compute_s += result.get("timing", {}).get("time/compute_s", 0.0)
        tell(self.study, self.spec, number, result)
        complete, _ = self.counts()
        self.logger.info(
            "trial %d done (%d/%d complete): top-1 %.2f %%, %d unique values, MLflow run %s",
            number,
            complete,
            self.spec.n_trials,
            100 * metrics["cls/acc"],
            metrics["ws/unique_values"],
            result.get("mlflow_run_id"),
        )

    def fail(self, number: int, why: str) -> None:
        self.logger.warning("trial %d failed: %s", number, why)
        with contextlib.suppress(UpdateFinishedTrialError):
            self.study.tell(number, state=TrialState.FAIL)
        self.failures += 1
        if self.failures > self.spec.n_trials:
            raise RuntimeError(f"more failed trials ({self.failures}) than trials asked for")

    def wait_for_others(self, deadline: float | None) -> bool:
        """Sleep while other drivers' trials fill the study; ``False`` once it is done."""
        requeued = self.fail_stale()
        if requeued:
            self.logger.info("trials %s lost their owner: failed and queued again", requeued)
            return True
        complete, running = self.counts()
        if complete >= self.spec.n_trials or (deadline is not None and time.time() > deadline):
            return False
        if running:
            time.sleep(POLL_SECONDS)
            return True
        return complete < self.spec.n_trials

    def run_in_process(self, deadline: float | None) -> None:
        """Trials one after another in this process.

        A trial that meets an outage waits it out (the calls inside it retry), so no new
        settings are asked meanwhile. One that the outage outlasts, or that a Ctrl-C or SIGTERM
        stops, is queued again with the same parameters before the driver stops: the same
        command later runs it first, and its experiment resumes from its checkpoints.
        """
        with Heartbeats(self.study, self.spec.study.heartbeat_s) as heartbeats:
            self.heartbeats = heartbeats
            while deadline is None or time.time() < deadline:
                self.fail_stale()
                asked = self.next_trial(heartbeats)
                if asked is None:
                    if not self.wait_for_others(deadline):
                        return
                    continue
                trial, config = asked
                complete, _ = self.counts()
                self.logger.info(
                    "trial %d (%d/%d complete so far): %s",
                    trial.number,
                    complete,
                    self.spec.n_trials,
                    trial.params,
                )
                try:
                    parameters = self.parameters(trial.number, trial.params, config)
                    result = trial_task(parameters, parameters["run_name"])
                except BaseException as err:
                    heartbeats.release(trial._trial_id)
                    if isinstance(err, InfraUnavailable) or is_interrupt(err):
                        with contextlib.suppress(InfraUnavailable):
                            requeue(self.study, trial.number)
                        raise
                    if not isinstance(err, Exception):
                        raise
                    self.fail(trial.number, repr(err))  # recorded; the sweep goes on
                    continue
                heartbeats.release(trial._trial_id)
                self.record(trial.number, {**result, "mlflow_run_id": result["run_id"]})

    def adoptable(self, client) -> dict[Any, FrozenTrial]:
        """Running trials whose deployment run is still going (or finished while no driver
        watched): adopt them instead of running them again."""
        adopted = {}
        for trial in trials_in(self.study, TrialState.RUNNING):
            run_id = trial.user_attrs.get("prefect_flow_run_id")
            if run_id is None:
                continue
            state = client.read_flow_run(run_id).state
            if state is not None and (not state.is_final() or state.is_completed()):
                adopted[run_id] = trial
        return adopted

    def trial_parameters(self, trial: optuna.Trial, config: ExperimentConfig) -> dict:
        """A pool trial's flow-run parameters: the trial heartbeats itself while it runs."""
        return self.parameters(trial.number, trial.params, config) | {
            "trial": {
                "storage": self.spec.study.portable_storage(),
                "study": self.spec.name,
                "number": trial.number,
                "heartbeat_s": self.spec.study.heartbeat_s,
            }
        }

    def run_on_pool(self, deployment: str, deadline: float | None) -> None:
        """Trials as deployment runs, up to ``max_parallel`` in flight.

        The driver keeps a queued trial alive; once its flow run runs, the flow run does. A
        trial that lost its owner (a killed worker) is failed and queued again by the stale
        check, and its flow run is marked crashed in Prefect.
        """
        in_flight: dict[Any, int] = {}
        storage = self.study._storage
        with (
            get_client(sync_client=True) as client,
            Heartbeats(self.study, self.spec.study.heartbeat_s) as heartbeats,
        ):
            self.heartbeats = heartbeats
            for run_id, trial in self.adoptable(client).items():
                heartbeats.own(trial._trial_id)
                in_flight[run_id] = trial.number
                self.logger.info("trial %d: adopted its flow run %s", trial.number, run_id)
            while True:
                requeued = self.fail_stale()
                if requeued:
                    self.logger.info("trials %s lost their worker: queued again", requeued)
                while len(in_flight) < self.spec.execution.max_parallel and (
                    deadline is None or time.time() < deadline
                ):
                    asked = self.next_trial(heartbeats)
                    if asked is None:
                        break
                    trial, config = asked
                    params = self.trial_parameters(trial, config)
                    run = run_deployment(
                        deployment,
                        parameters=params,
                        flow_run_name=params["run_name"],
                        timeout=0,
                    )
                    trial.set_user_attr("prefect_flow_run_id", str(run.id))
                    in_flight[run.id] = trial.number
                    self.logger.info(
                        "trial %d submitted as flow run %s: %s", trial.number, run.id, trial.params
                    )
                if not in_flight:
                    if not self.wait_for_others(deadline):
                        return
                    continue
                time.sleep(POLL_SECONDS)
                for run_id, number in list(in_flight.items()):
                    trial_id = storage.get_trial_id_from_study_id_trial_number(
                        self.study._study_id, number
                    )
                    state = client.read_flow_run(run_id).state
                    if storage.get_trial(trial_id).state == TrialState.FAIL:
                        del in_flight[run_id]
                        heartbeats.release(trial_id)
                        if state is not None and not state.is_final():
                            client.set_flow_run_state(
                                run_id,
                                Crashed(message=f"trial {number} lost its worker's heartbeat"),
                                force=True,
                            )
                        self.failures += 1
                        continue
                    if state is None or not state.is_final():
                        if state is not None and state.is_running():
                            heartbeats.release(trial_id)  # the flow run heartbeats now
                        else:
                            heartbeats.own(trial_id)
                        continue
                    del in_flight[run_id]
                    heartbeats.release(trial_id)
                    if state.is_completed():
                        self.record(
                            number, child_result(self.spec.name, self.parent_run_id, number)
                        )
                    else:
                        self.fail(number, f"flow run {run_id} ended {state.type.value}")


def child_result(experiment: str, parent_run_id: str, number: int) -> dict[str, Any]:
    """Final metrics of trial ``number`` as its MLflow run logged them (trials run elsewhere)."""
    client: MlflowClient = mlflow_client()
    mine = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{number}'"
    runs = retried(
        lambda: client.search_runs([experiment_id(client, experiment)], filter_string=mine),
        "search runs",
    )
    if not runs:
        raise RuntimeError(f"trial {number} left no MLflow run under {parent_run_id}")
    logged = runs[0].data.metrics
    return {
        "metrics": {
            k.removeprefix("final/"): v for k, v in logged.items() if k.startswith("final/")
        },
        "timing": {k: v for k, v in logged.items() if k.startswith("time/")},
        "mlflow_run_id": runs[0].info.run_id,
        "pretrained_accuracy": logged.get("pretrain/test_acc"),
    }


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial: parameters, accuracy, unique values, Pareto membership."""
    front = (
        {t.number for t in study.best_trials} if trials_in(study, TrialState.COMPLETE) else set()
    )
    rows = [
        {
            "trial": t.number,
            **{f"param.{k}": v for k, v in t.params.items()},
            **{name: t.user_attrs.get(name) for name in REPORTED},
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "pareto": t.number in front,
        }
        for t in trials_in(study, TrialState.COMPLETE)
    ]
    return pd.DataFrame(rows)


def summary_metrics(study: optuna.Study, table: pd.DataFrame) -> dict[str, float]:
    """Best top-1, the smallest unique count within one point of the reference accuracy, and
    the size of the Pareto front (the reference: the pretrained model's top-1 when trials
    recorded it, else the best trial's)."""
    if table.empty:
        return {"sweep/complete_trials": 0.0}
    references = [
        t.user_attrs["pretrained_accuracy"]
        for t in trials_in(study, TrialState.COMPLETE)
        if t.user_attrs.get("pretrained_accuracy") is not None
    ]
    reference = max(references) if references else float(table["accuracy"].max())
    close = table[table["accuracy"] >= reference - DROP_TOLERANCE]
    return {
        "sweep/complete_trials": float(len(table)),
        "sweep/best_accuracy": float(table["accuracy"].max()),
        "sweep/reference_accuracy": float(reference),
        "sweep/min_unique_values_within_1pt": (
            float(close["unique_values"].min()) if not close.empty else math.nan
        ),
        "sweep/pareto_size": float(table["pareto"].sum()),
    }


def importances(study: optuna.Study, spec: SweepSpec) -> dict[str, dict[str, float]]:
    """Parameter importances per objective, for the direction it is optimised in.

    Optuna's evaluator ranks what leads to *low* values, so maximised objectives are negated.
    With fewer than :data:`MIN_IMPORTANCE_TRIALS` complete trials there is nothing to rank.
    """
    complete = trials_in(study, TrialState.COMPLETE)
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}
    found = {}
    for index, name in enumerate(spec.study.objectives):
        sign = -1.0 if OBJECTIVES[name].direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                found[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=index, s=sign: s * t.values[i]
                )
        except (RuntimeError, ValueError, ZeroDivisionError) as err:
            get_run_logger().info("no parameter importances for %s: %s", name, err)
    return found


def _method_label(spec: SweepSpec) -> str:
    """The method a sweep tunes, or "several methods" when the space swaps the section."""
    methods = {
        spec.trial_config(
            {key: label for key, label in zip(spec.space, labels, strict=True)}
        ).compression.method
        for labels in zip(*(dim.probe_labels() for dim in spec.space.values()), strict=False)
    }
    return methods.pop() if len(methods) == 1 else "several methods"


def _report(study: optuna.Study, spec: SweepSpec, parent, folder: Path) -> pd.DataFrame:
    logger = get_run_logger()
    table = trials_table(study)
    tables = folder / "trials.parquet"
    with atomic_path(tables) as tmp:
        table.to_parquet(tmp, index=False)
    parent.log_artifact(tables, "tables")
    summary = summary_metrics(study, table)
    if not table.empty:
        title = f"{spec.name}: {len(table)} trials ({_method_label(spec)})"
        objectives = spec.study.objectives
        cost = objectives[1] if objectives[0] == "accuracy" and len(objectives) > 1 else None
        plot = pareto_front(
            table,
            folder / "pareto_front.png",
            title,
            summary.get("sweep/reference_accuracy"),
            cost=cost if cost in table else "unique_values",
            cost_label=OBJECTIVES[cost].label if cost in table else "unique values",
        )
        parent.log_artifact(plot, "plots")
    found = importances(study, spec)
    if not found:
        logger.info(
            "parameter importances skipped: %d complete trials, at least %d needed",
            len(table),
            MIN_IMPORTANCE_TRIALS,
        )
    for name, values in found.items():
        objective = OBJECTIVES[name]
        better = "higher" if objective.direction == "maximize" else "lower"
        path = bar_chart(
            values,
            folder / f"importance_{name}.png",
            f"what drives {objective.label} ({better} is better)\n"
            f"{spec.name}, {_method_label(spec)}, {len(table)} trials",
            "importance (PED-ANOVA, normalised)",
        )
        parent.log_artifact(path, "plots")
    parent.log_metrics(summary)
    return table


def _run_name() -> str:
    return f"sweep-{Path(str(flow_run.parameters.get('sweep', 'sweep'))).stem}"


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
    run_name = f"sweep-{spec.name}"
    tags = {"kind": "sweep", "sampler": spec.sampler, "optuna.study": spec.name}
    with file_lock(folder / ".parent.lock"):  # drivers started together share one parent run
        parent_id = study.user_attrs.get("mlflow_run_id")
        if parent_id is None or find_run(spec.name, parent_id) is None:
            created = tags | ({"prefect.flow_run_id": flow_run.id} if flow_run.id else {})
            parent_id = RunTracker.open(spec.name, run_name, created).run_id
            study.set_user_attr("mlflow_run_id", parent_id)
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
        parent.log_params(
            {
                "sweep.n_trials": spec.n_trials,
                "sweep.sampler": spec.sampler,
                "sweep.objectives": ",".join(spec.study.objectives),
                "sweep.space": json.dumps(sorted(spec.space)),
                "sweep.base": spec.base.name,
            }
        )
        closed = close_orphaned_runs(study, spec.name, parent.run_id)
        if closed:
            logger.info("closed MLflow runs left RUNNING by a stopped driver: %s", closed)
        earlier = parent.logged_metrics()
        write_text_atomic(folder / "sweep.yaml", dump_spec(spec))
        parent.log_artifact(folder / "sweep.yaml")
        driver = Driver(study, spec, parent.run_id, progress)
        if trial_deployment:
            driver.run_on_pool(trial_deployment, deadline)
        else:
            driver.run_in_process(deadline)
        table = _report(study, spec, parent, folder)
        timing = _timing(earlier, time.perf_counter() - started, driver.compute_s)
        parent.log_metrics(timing)
    logger.info(
        "sweep %s: %d complete trials, Pareto front:\n%s",
        spec.name,
        len(table),
        table[table["pareto"]].to_string(index=False) if not table.empty else "(empty)",
    )
    return _sweep_result(spec, table, parent.run_id, parent.url, timing)


def _timing(earlier: dict[str, float], wall_s: float, compute_s: float) -> dict[str, float]:
    """The sweep's timings over every session that worked on it (a continued sweep adds)."""
    wall = earlier.get("sweep/wall_s", 0.0) + wall_s
    compute = earlier.get("sweep/compute_s", 0.0) + compute_s
    return {
        "sweep/wall_s": wall,
        "sweep/compute_s": compute,
        "sweep/orchestration_s": wall - compute,
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

    Done: ``n_trials`` complete trials, none running, and a FINISHED parent run whose report
    counted them all. Such a sweep is left as it is, timings and links included.
    """
    complete = trials_in(study, TrialState.COMPLETE)
    if len(complete) < spec.n_trials or trials_in(study, TrialState.RUNNING, TrialState.WAITING):
        return None
    parent = find_run(spec.name, parent_id)
    if parent is None or parent.info.status != "FINISHED":
        return None
    metrics = parent.data.metrics
    if metrics.get("sweep/complete_trials") != float(len(complete)):
        return None
    tracker = RunTracker.reopened(spec.name, parent_id)
    timing = {k: v for k, v in metrics.items() if k in ("sweep/wall_s", "sweep/compute_s")}
    timing["sweep/orchestration_s"] = timing.get("sweep/wall_s", 0.0) - timing.get(
        "sweep/compute_s", 0.0
    )
    return _sweep_result(spec, trials_table(study), parent_id, tracker.url, timing) | {
        "already_complete": True
    }


def close_orphaned_runs(study: optuna.Study, experiment: str, parent_run_id: str) -> list[str]:
    """End the trial runs a stopped driver left RUNNING (FINISHED if their trial completed).

    A trial that is still running (this study's heartbeats say so) keeps its run; a trial that
    is queued again reopens its run when it runs, whatever its status now.
    """
    client = mlflow_client()
    running = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    runs = retried(
        lambda: client.search_runs([experiment_id(client, experiment)], filter_string=running),
        "search runs",
    )
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = []
    for run in runs:
        number = run.data.tags.get(TRIAL_TAG)
        state = states.get(int(number)) if number is not None and number.isdigit() else None
        if state == TrialState.RUNNING:
            continue
        status = "FINISHED" if state == TrialState.COMPLETE else "FAILED"
        RunTracker(run.info.run_id, run.info.experiment_id, client).finish(status)
        closed.append(run.info.run_id)
    return closed


def pareto_report(spec: SweepSpec) -> pd.DataFrame | None:
    """The study's complete trials with the Pareto front marked; ``None`` without a study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=spec.study.resolved_storage())
    except KeyError:
        return None
    return trials_table(study)
