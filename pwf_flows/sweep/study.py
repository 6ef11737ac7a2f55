"""The study: opened (or continued) with a sampler seeded for where it stands, asked for a
trial's settings, told a trial's result."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.samplers import BaseSampler, GridSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from pwf_core._seeding import derive_seed
from pwf_core.config import ExperimentConfig
from pwf_flows.sweep.notes import save_trial_note, trial_note
from pwf_flows.sweep.spec import OBJECTIVES, SweepSpec
from pwf_flows.sweep.trials import quiet_optuna, storage_for

# Set by the early-stopping rule on a trial it stopped (pwf_flows.sweep.early_stopping).
STOPPED_ATTR = "early_stopped"

TRIAL_TAG = "sweep.trial"
REPORTED = {
    "accuracy": "cls/acc",
    "unique_values": "ws/unique_values",
    "nll": "cls/nll",
    "ece": "cal/ece",
}


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


def trials_in(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def objective_values(spec: SweepSpec, metrics: dict[str, float]) -> list[float]:
    """The trial's values in the order of the study's objectives (and directions)."""
    return [float(metrics[key]) for key in spec.study.metric_keys]


def _record(
    study: optuna.Study, number: int, result: dict[str, Any], attrs: dict[str, Any]
) -> None:
    metrics = result["metrics"]
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    for name, key in REPORTED.items():
        if key in metrics:
            study._storage.set_trial_user_attr(trial_id, name, float(metrics[key]))
    for key in ("mlflow_run_id", "mlflow_run_url", "pretrained_accuracy"):
        if result.get(key) is not None:
            study._storage.set_trial_user_attr(trial_id, key, result[key])
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    if result.get("mlflow_run_url"):  # a link optuna-dashboard renders (attributes are text)
        save_trial_note(study, trial_id, trial_note(number, result))


def tell(
    study: optuna.Study,
    spec: SweepSpec,
    number: int,
    result: dict[str, Any],
    attrs: dict[str, Any] | None = None,
) -> None:
    """Report a finished trial: its objective values (its replicates' means), and what the
    report and links need (``attrs``: the replicates' spread)."""
    _record(study, number, result, attrs or {})
    study.tell(number, objective_values(spec, result["metrics"]))


def prune(
    study: optuna.Study,
    spec: SweepSpec,
    number: int,
    last_metrics: dict[str, float],
    stopped: dict[str, Any],
    links: dict[str, Any] | None = None,
) -> None:
    """Mark a trial that early stopping ended PRUNED, its last values kept as attributes
    (``accuracy``, ``unique_values``... at the round it stopped after).

    Args:
        links: ``mlflow_run_id``, ``mlflow_run_url``, ``run_name``: the trial's run and note.
    """
    values = {}
    for name in spec.study.objectives:
        value = OBJECTIVES[name].at_step(last_metrics)
        if value is not None:
            values[name] = value
    _record(study, number, {"metrics": {}, **(links or {})}, values | {STOPPED_ATTR: stopped})
    study.tell(number, state=TrialState.PRUNED)


def trials_done(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that used up their place in ``n_trials``: complete, or stopped early (not the
    PRUNED that were never run: duplicates, a surplus)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.state == TrialState.COMPLETE or STOPPED_ATTR in t.user_attrs
    ]


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


def trial_run_name(number: int, params: dict[str, Any], method: str) -> str:
    """``pwfn reg=0.00123, b=5 (trial 3)``: what differs first (the method, then what the
    trial tried), the trial's number last, where a cut-off name still shows the rest. A
    choice of a whole section (``compression: {pwfn b=4 o=1: ...}``) shows by its label."""
    shown = []
    for key, value in params.items():
        if value == method:
            continue  # a choice of method, named by the method itself
        shown.append(_short(value) if "." not in key else f"{key.split('.')[-1]}={_short(value)}")
    described = ", ".join(shown)
    if described.startswith(f"{method} "):
        described = described[len(method) + 1 :]  # a label that starts with the method
    return " ".join(part for part in (method, described, f"(trial {number})") if part)


def duplicate_of(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of a complete, running or early-stopped trial with the same parameters."""
    for other in [*trials_done(study), *trials_in(study, TrialState.RUNNING)]:
        if other.number != trial.number and other.params == trial.params:
            return other.number
    return None
