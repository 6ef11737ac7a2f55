"""Early stopping for sweeps of several objectives: a trial already beaten part way stops.

Optuna prunes single-objective studies only (``Trial.report`` raises for several objectives,
optuna#3450), so pwf does it itself. After each round (each epoch for 2DGBNN) a sweep trial's
run records its point, its objectives at that step, in the study (a user attribute per
replicate, with the compute spent so far). From ``from_round`` on, the point (the mean of the
replicates that reached the step) is compared with the same step's points of the completed
trials: when at least ``min_dominating`` of them are better in every objective by the margins,
the trial stops there. Its run ends FINISHED and says why; the driver marks it PRUNED in
Optuna (its last values kept as attributes), so NSGA-II samples on from the completed trials.

:func:`replay` applies a rule to a finished sweep's recorded histories: which trials it would
have stopped, the compute it would have saved, and whether a trial of the final Pareto front
would have been lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pwf_flows.sweep.spec import OBJECTIVES, EarlyStoppingSpec, expand_storage
from pwf_flows.sweep.study import STOPPED_ATTR
from pwf_flows.sweep.trials import storage_for

ROUNDS_ATTR = "rounds"  # rounds.<replicate>: [[objective values..., compute seconds], ...]
STEPS_ATTR = "steps"  # how many steps the trial's plan has (its schedule's rounds)
__all__ = ["STOPPED_ATTR", "Decision", "RoundMonitor", "Rule", "dominating", "replay"]

Point = tuple[float, ...]


def rounds_key(replicate: int) -> str:
    return f"{ROUNDS_ATTR}.{replicate}"


def dominating(
    point: Point,
    others: Mapping[int, Point],
    directions: Sequence[str],
    margins: Sequence[float],
) -> list[int]:
    """The keys of ``others`` whose points beat ``point`` in every objective by its margin
    (no worse, for a margin of 0) and strictly in at least one.

    Args:
        point: The trial's objective values.
        others: Other trials' values at the same step, by trial number.
        directions: ``maximize`` or ``minimize`` per objective.
        margins: How much better each objective must be, in its units.
    """
    better = []
    for number, other in others.items():
        gains = [
            (o - p) if direction == "maximize" else (p - o)
            for p, o, direction in zip(point, other, directions, strict=True)
        ]
        if all(g >= m for g, m in zip(gains, margins, strict=True)) and any(g > 0 for g in gains):
            better.append(number)
    return sorted(better)


def step_points(trial: FrozenTrial) -> dict[int, list[list[float]]]:
    """A trial's recorded points by replicate: ``{replicate: [[values..., seconds], ...]}``."""
    recorded = {}
    for key, value in trial.user_attrs.items():
        if key.startswith(f"{ROUNDS_ATTR}.") and isinstance(value, list):
            recorded[int(key.rsplit(".", 1)[1])] = value
    return recorded


def mean_point(trial: FrozenTrial, step: int, width: int) -> Point | None:
    """The mean of the trial's replicates' points at ``step`` (0-based), if any reached it."""
    points = [rows[step][:width] for rows in step_points(trial).values() if len(rows) > step]
    if not points:
        return None
    return tuple(math.fsum(p[i] for p in points) / len(points) for i in range(width))


@dataclass(frozen=True)
class Decision:
    """Whether a trial stops after a step, and which completed trials beat it there.

    Args:
        stop: Stop now.
        step: The step (0-based) the decision was made after.
        by: The completed trials that dominate its point.
    """

    stop: bool
    step: int = -1
    by: tuple[int, ...] = ()


@dataclass
class Rule:
    """An early-stopping rule over a study's objectives."""

    spec: EarlyStoppingSpec
    objectives: Sequence[str]

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name].direction for name in self.objectives]

    @property
    def margins(self) -> list[float]:
        return [self.spec.margins.get(name, 0.0) for name in self.objectives]

    def point(self, metrics: Mapping[str, float]) -> Point | None:
        """A step's objective values (``None`` when the step does not measure them all)."""
        values = [OBJECTIVES[name].at_step(dict(metrics)) for name in self.objectives]
        return None if any(v is None for v in values) else tuple(values)  # type: ignore[arg-type]

    def decide(
        self,
        point: Point,
        step: int,
        completed: Iterable[FrozenTrial],
        steps: int | None = None,
    ) -> Decision:
        """Stop at ``step`` when enough ``completed`` trials dominate ``point`` there.

        Args:
            steps: The trial's plan length: only completed trials of as many steps are
                compared (round 3 of a five-round schedule is not round 3 of a ten-round one).
        """
        if step + 1 < self.spec.from_round:
            return Decision(False, step)
        width = len(self.objectives)
        others = {}
        for trial in completed:
            if steps is not None and trial.user_attrs.get(STEPS_ATTR, steps) != steps:
                continue
            other = mean_point(trial, step, width)
            if other is not None:
                others[trial.number] = other
        by = dominating(point, others, self.directions, self.margins)
        return Decision(len(by) >= self.spec.min_dominating, step, tuple(by))


class RoundMonitor:
    """In a sweep trial's run: records each step's point in the study and asks the rule.

    Args:
        request: What the driver passed: ``storage``, ``study``, ``number``, ``replicate``,
            ``heartbeat_s``, ``objectives`` and the ``rule`` (an early-stopping spec as a
            mapping, or ``None`` to only record the points).
        steps: How many steps the run's plan has.
    """

    def __init__(self, request: Mapping[str, Any], steps: int) -> None:
        self.storage = storage_for(expand_storage(request["storage"]), int(request["heartbeat_s"]))
        self.study_id = self.storage.get_study_id_from_name(request["study"])
        self.number = int(request["number"])
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(
            self.study_id, self.number
        )
        self.replicate = int(request.get("replicate", 0))
        spec = request.get("rule")
        self.rule = Rule(EarlyStoppingSpec.model_validate(spec or {}), list(request["objectives"]))
        self.active = spec is not None
        self.steps = steps
        self.storage.set_trial_user_attr(self.trial_id, STEPS_ATTR, steps)

    def after_step(self, step: int, metrics: Mapping[str, float], compute_s: float) -> Decision:
        """Record the step's point; whether the trial stops here (its own earlier replicate's
        decision counts too)."""
        point = self.rule.point(metrics)
        if point is None:
            return Decision(False, step)
        trial = self.storage.get_trial(self.trial_id)
        rows = list(trial.user_attrs.get(rounds_key(self.replicate), []))[:step]
        rows.append([*point, float(compute_s)])
        self.storage.set_trial_user_attr(self.trial_id, rounds_key(self.replicate), rows)
        if not self.active:
            return Decision(False, step)
        stopped = trial.user_attrs.get(STOPPED_ATTR)
        if stopped is not None:  # another replicate of the trial was stopped already
            return Decision(True, step, tuple(stopped.get("by", ())))
        trial = self.storage.get_trial(self.trial_id)
        completed = self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.COMPLETE,)
        )
        mine = mean_point(trial, step, len(point)) or point
        decision = self.rule.decide(mine, step, completed, self.steps)
        if decision.stop:
            self.storage.set_trial_user_attr(
                self.trial_id, STOPPED_ATTR, {"round": step + 1, "by": list(decision.by)}
            )
        return decision


@dataclass
class ReplayResult:
    """What a rule would have done to a finished sweep.

    Args:
        stopped: Trial number → (the round it would stop after, the trials that beat it).
        compute_s: The recorded compute of every trial replayed.
        saved_s: The compute the stopped trials would not have spent.
        lost_pareto: Trials of the final Pareto front that would have been stopped.
        replayed: How many trials had recorded histories.
    """

    stopped: dict[int, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    compute_s: float = 0.0
    saved_s: float = 0.0
    lost_pareto: list[int] = field(default_factory=list)
    replayed: int = 0

    @property
    def saved_share(self) -> float:
        return self.saved_s / self.compute_s if self.compute_s else 0.0


def _compute(trial: FrozenTrial, width: int) -> float:
    """A trial's recorded compute: the last recorded cumulative seconds of each replicate."""
    return math.fsum(rows[-1][width] for rows in step_points(trial).values() if rows)


def _compute_until(trial: FrozenTrial, step: int, width: int) -> float:
    return math.fsum(
        rows[min(step, len(rows) - 1)][width] for rows in step_points(trial).values() if rows
    )


def replay(study: optuna.Study, rule: Rule) -> ReplayResult:
    """Apply ``rule`` to the completed trials of ``study`` in the order they started: a
    trial's decision at a step uses the trials completed before it started, as a live sweep
    of trials one after another would have had them.
    """
    width = len(rule.objectives)
    trials = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if step_points(t)
    ]
    trials.sort(key=lambda t: (t.datetime_start, t.number))
    result = ReplayResult(replayed=len(trials))
    survivors: list[FrozenTrial] = []
    for trial in trials:
        result.compute_s += _compute(trial, width)
        before = [
            t
            for t in survivors
            if t.datetime_complete is not None
            and trial.datetime_start is not None
            and t.datetime_complete <= trial.datetime_start
        ]
        steps = max(len(rows) for rows in step_points(trial).values())
        for step in range(steps):
            point = mean_point(trial, step, width)
            if point is None:
                break
            decision = rule.decide(point, step, before, trial.user_attrs.get(STEPS_ATTR))
            if decision.stop:
                result.stopped[trial.number] = (step + 1, decision.by)
                result.saved_s += _compute(trial, width) - _compute_until(trial, step, width)
                break
        else:
            survivors.append(trial)
    pareto = {t.number for t in study.best_trials}
    result.lost_pareto = sorted(pareto & set(result.stopped))
    return result
