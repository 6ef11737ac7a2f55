"""Sweep files: a base experiment config, a search space over its fields, and the study.

A sweep file is YAML a user edits::

    name: full-sweep
    base: ../configs/default.yaml          # relative to the sweep file
    overrides: {train.epochs: 1}           # applied to every trial
    space:
      compression.reg: {float: [1.0e-5, 1.0e-2], log: true}
      compression.b: {int: [4, 8]}
      compression.sigma_join: {choices: [std_mu, keep, divide_by_10]}
      compression.schedule:                # labelled choices for values Optuna cannot hold
        choices: {paper: [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0], short: [0.5, 1.0]}
    study:
      objectives: [accuracy, unique_values]
      n_trials: 12

It is validated like a config, before anything runs: every space key must be a field of the
base config (the values at both ends of each range, and every choice, are checked by building
the trial config), ranges must be non-empty, and the storage URL must be one Optuna can open.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pwf_core._files import sqlite_file_problem
from pwf_core.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    check_name,
    parse_config,
    read_yaml,
)


class Objective(NamedTuple):
    """An objective: the final metric it reads, its direction, its name in the UIs, and what
    a step reports of it while the run goes on (a fixing round's codebook so far, where the
    final count of all values would still count the free weights)."""

    metric: str
    direction: str
    label: str
    progress: tuple[str, ...]

    def at_step(self, metrics: dict[str, float]) -> float | None:
        """The objective's value in a step's metrics, the first of its progress keys a step
        records (``None`` when it records none)."""
        for key in self.progress:
            if key in metrics:
                return float(metrics[key])
        return None


OBJECTIVES = {
    "accuracy": Objective("cls/acc", "maximize", "top-1", ("cls/acc",)),
    # Mid-run, the values the weights would take if fixed now to their nearest centres; the
    # codebook so far (early rounds fix the small weights, most to 0) where a method cannot say.
    "unique_values": Objective(
        "ws/unique_values",
        "minimize",
        "unique values",
        ("ws/projected_values", "ws/unique_fixed_values", "ws/unique_values"),
    ),
    "nll": Objective("cls/nll", "minimize", "NLL", ("cls/nll",)),
    "ece": Objective("cal/ece", "minimize", "ECE", ("cal/ece",)),
    "entropy_bits": Objective(
        "ws/entropy_bits", "minimize", "weight entropy (bits)", ("ws/entropy_bits",)
    ),
}
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs, files and reports)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


# A database that accepts a connection and never answers must not hold a command for minutes:
# every connection attempt gives up after this long (psycopg and PyMySQL read it).
CONNECT_TIMEOUT_S = 10


def connect_args(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """The DBAPI connection arguments for a study database at ``url``: a bounded connection
    attempt (a SQLite file instead waits up to a minute for another writer's lock)."""
    if url.startswith("sqlite"):
        return {"timeout": 60}
    return {"connect_timeout": max(1, math.ceil(timeout_s))}


def expand_storage(url: str) -> str:
    """``url`` with ``${VAR}`` references (e.g. a password from ``.env``) filled in."""
    return os.path.expandvars(url)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Dimension(_Strict):
    """One searched field: a float or int range, or a set of choices.

    Args:
        float_range: ``[low, high]`` for a float (YAML key ``float``).
        int_range: ``[low, high]`` for an int, both included (YAML key ``int``).
        log: Sample the range on a log scale.
        step: Grid step of a range (ints default to 1).
        choices: A list of scalars, or a mapping ``label: value`` for any YAML value.
    """

    float_range: tuple[float, float] | None = Field(None, alias="float")
    int_range: tuple[int, int] | None = Field(None, alias="int")
    log: bool = False
    step: float | None = None
    choices: list[Any] | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in (self.float_range, self.int_range, self.choices) if k is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of 'float: [low, high]', 'int: [low, high]', 'choices'"
            )
        bounds = self.float_range or self.int_range
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise ValueError(f"empty range [{low}, {high}]: low must be below high")
            if self.log and low <= 0:
                raise ValueError(f"a log range needs low > 0, got {low}")
            if self.log and self.step is not None:
                raise ValueError("a range cannot have both log and step")
        elif not self.choices:
            raise ValueError("choices is empty")
        elif isinstance(self.choices, list):
            bad = [
                c for c in self.choices if not isinstance(c, (str, int, float, bool, type(None)))
            ]
            if bad:
                raise ValueError(f"choices {bad} are not scalars; give them labels as a mapping")
        return self

    def labels(self) -> list[Any]:
        """What Optuna sees for a choice dimension (the labels of a mapping)."""
        assert self.choices is not None
        return list(self.choices)  # a mapping's keys, or the list itself

    def value_of(self, suggested: Any) -> Any:
        """The config value for what Optuna suggested (a label maps to its value)."""
        if isinstance(self.choices, dict):
            return self.choices[suggested]
        return suggested

    def probe_labels(self) -> list[Any]:
        """What Optuna could suggest at the probes: both ends, or every choice's label."""
        if self.choices is not None:
            return self.labels()
        return list(self.float_range or self.int_range)  # type: ignore[arg-type]

    def probe_values(self) -> list[Any]:
        """Values that validation builds trial configs from: both ends, or every choice."""
        if self.choices is not None:
            return [self.value_of(label) for label in self.labels()]
        return list(self.float_range or self.int_range)  # type: ignore[arg-type]

    def grid(self) -> list[Any]:
        """The values of a grid search over this dimension."""
        if self.choices is not None:
            return self.labels()
        if self.int_range is not None:
            low, high = self.int_range
            return list(range(low, high + 1, int(self.step or 1)))
        if self.step is None:
            raise ValueError("a float range in a grid sweep needs a step")
        low, high = self.float_range  # type: ignore[misc]
        count = math.floor((high - low) / self.step + 1e-9) + 1
        return [low + i * self.step for i in range(count)]


class EarlyStoppingSpec(_Strict):
    """Stop a trial that, part way, is already beaten: after round ``from_round`` (each epoch
    for 2DGBNN), a trial's point (its objectives at that round, the mean of its replicates)
    is compared with the same round's points of the completed trials of as many rounds; it is
    stopped when at least ``min_dominating`` of them dominate it beyond the margins. Optuna has
    no pruning for several objectives, so this is pwf's own rule
    (:mod:`pwf_flows.sweep.early_stopping`).

    Args:
        from_round: The first round (1-based) at which a trial can be stopped.
        min_dominating: Completed trials that must dominate the point.
        margins: By how much a completed trial must be better in each objective, in the
            objective's units (``accuracy: 0.005`` is half a point of top-1); an objective
            not named need only be no worse (and one of them strictly better).
    """

    from_round: int = Field(2, ge=1)
    min_dominating: int = Field(2, ge=1)
    margins: dict[str, float] = Field(default_factory=dict)

    @field_validator("margins")
    @classmethod
    def _known(cls, margins: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(margins) - set(OBJECTIVES))
        if unknown:
            raise ValueError(
                f"margins of unknown objectives {unknown}; known: {sorted(OBJECTIVES)}"
            )
        if any(value < 0 or not math.isfinite(value) for value in margins.values()):
            raise ValueError("margins must be finite and not negative")
        return margins


class StudySpec(_Strict):
    """The Optuna study.

    Args:
        objectives: Names from ``accuracy`` (maximised), ``unique_values``, ``nll``, ``ece``,
            ``entropy_bits`` (minimised), measured on the final fixed model.
        sampler: ``auto`` is NSGA-II for several objectives and TPE for one; ``grid`` runs the
            full grid of the space; ``random``.
        seed: Sampler seed.
        n_trials: Complete trials wanted (a grid defaults to its size).
        timeout_s: Stop asking for new trials after this long.
        storage: Optuna storage URL; relative sqlite paths are resolved against the working
            directory (the default sits beside ``mlruns.db``). PostgreSQL on a cluster, with
            the password as ``${VAR}`` from the environment rather than written in the file.
        heartbeat_s: Seconds between heartbeats of running trials; a trial silent for three
            of them has lost its process and is retried.
        replicates: Runs of every trial configuration under as many seeds (see
            :class:`~pwf_core.config.schema.ReplicateConfig`); Optuna is told their mean, and
            their std, n and 95 % interval are the trial's attributes.
        replicate_reseeds: ``compression`` (one pretrained model shared by every replicate and
            method: paired comparisons) or ``all`` (each replicate pretrains its own).
        early_stopping: Stop trials that are already beaten part way (off when absent).
    """

    objectives: list[Literal["accuracy", "unique_values", "nll", "ece", "entropy_bits"]] = [
        "accuracy",
        "unique_values",
    ]
    sampler: Literal["auto", "nsga2", "tpe", "grid", "random"] = "auto"
    seed: int = 0
    n_trials: int | None = Field(None, gt=0)
    timeout_s: float | None = Field(None, gt=0)
    storage: str = "sqlite:///optuna.db"
    heartbeat_s: int = Field(10, ge=1, le=3600)
    replicates: int = Field(1, ge=1, le=100)
    replicate_reseeds: Literal["compression", "all"] = "compression"
    early_stopping: EarlyStoppingSpec | None = None

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives: list[str]) -> list[str]:
        if not objectives or len(set(objectives)) != len(objectives):
            raise ValueError("objectives must be a non-empty list without repeats")
        return objectives

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str) -> str:
        shown = masked_url(url)
        try:
            parsed = make_url(expand_storage(url))
        except ArgumentError:
            raise ValueError(f"'{shown}' is not a database URL") from None
        if parsed.get_backend_name() not in STORAGE_SCHEMES:
            raise ValueError(f"storage '{shown}' must be one of {', '.join(STORAGE_SCHEMES)}")
        if parsed.get_backend_name() == "sqlite":
            if not parsed.database:
                raise ValueError(f"sqlite storage '{shown}' names no file")
            problem = sqlite_file_problem(Path(parsed.database).expanduser().resolve())
            if problem is not None:
                raise ValueError(f"sqlite storage '{shown}': {problem}")
        return url

    @model_validator(mode="after")
    def _margins_of_objectives(self) -> StudySpec:
        if self.early_stopping is not None:
            extra = sorted(set(self.early_stopping.margins) - set(self.objectives))
            if extra:
                raise ValueError(
                    f"early_stopping.margins names {extra}, which are not this study's "
                    f"objectives {self.objectives}"
                )
        return self

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name].direction for name in self.objectives]

    @property
    def metric_keys(self) -> list[str]:
        return [OBJECTIVES[name].metric for name in self.objectives]

    def portable_storage(self) -> str:
        """The storage URL for another process (a worker): a relative sqlite path made
        absolute, ``${VAR}`` references left for that process to fill in."""
        url = make_url(expand_storage(self.storage))
        if url.get_backend_name() == "sqlite" and not Path(url.database).is_absolute():
            return self.resolved_storage()
        return self.storage

    def resolved_storage(self) -> str:
        """The storage URL to connect with: variables expanded, a relative sqlite path made
        absolute. It may hold a password: show :func:`masked_url` of it, never the URL."""
        expanded = expand_storage(self.storage)
        url = make_url(expanded)
        if url.get_backend_name() == "sqlite" and not Path(url.database).is_absolute():
            return f"sqlite:///{Path(url.database).expanduser().resolve()}"
        return expanded


class ExecutionSpec(_Strict):
    """Where trials run.

    Args:
        max_parallel: Trials in flight at once when they run as deployment runs (one per GPU
            worker); in-process trials run one at a time.
        artifacts_dir: Artifacts folder shared by the trials.
        infra_timeout_s: How long the driver and its trials wait out an outage of the
            tracking server, the study database or the Prefect API before they stop (the trial
            is queued again and the same command continues it); by default the base config's
            ``execution.infra_timeout_s``.
    """

    max_parallel: int = Field(1, ge=1)
    artifacts_dir: str = "artifacts"
    infra_timeout_s: float | None = Field(None, gt=0)


class ReportSpec(_Strict):
    """How the sweep's report compares its trials (``pwf report --sweep`` takes the same).

    Args:
        reference: The method the others are compared with, paired on their shared seeds
            (default: the first method in the report's order).
        budgets: The counts of unique values at which the methods are compared ("top-1 at
            <= K unique values").
    """

    reference: str | None = None
    budgets: list[int] = Field(default_factory=lambda: [8, 16, 32, 64])

    @field_validator("budgets")
    @classmethod
    def _positive(cls, budgets: list[int]) -> list[int]:
        if not budgets or any(k < 1 for k in budgets):
            raise ValueError("budgets must be a non-empty list of counts of at least 1")
        return sorted(set(budgets))


class SweepSpec(_Strict):
    """A validated sweep: base config, fixed overrides, search space, study, execution and
    how its report compares the trials."""

    name: str
    base: Path
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_name(name)

    space: dict[str, Dimension]
    study: StudySpec = StudySpec()
    execution: ExecutionSpec = ExecutionSpec()
    report: ReportSpec = ReportSpec()

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: dict[str, Dimension]) -> dict[str, Dimension]:
        if not space:
            raise ValueError("the search space is empty")
        return space

    def base_values(self) -> dict[str, Any]:
        """The base config with the sweep's fixed overrides and its name applied (and the
        sweep's outage budget, which its trials share)."""
        values = apply_overrides(read_yaml(self.base), self.overrides)
        fixed: dict[str, Any] = {"name": self.name}
        if self.execution.infra_timeout_s is not None:
            fixed["execution.infra_timeout_s"] = self.execution.infra_timeout_s
        return apply_overrides(values, fixed)

    @property
    def infra_timeout_s(self) -> float:
        """The outage budget of the driver and its trials."""
        return parse_config(self.base_values()).execution.infra_timeout_s

    def trial_config(self, params: dict[str, Any], replicate: int = 0) -> ExperimentConfig:
        """The experiment config of a trial from Optuna's suggested ``params`` (of one of its
        replicates)."""
        chosen = {key: self.space[key].value_of(value) for key, value in params.items()}
        chosen["replicate"] = {"index": replicate, "reseeds": self.study.replicate_reseeds}
        return parse_config(apply_overrides(self.base_values(), chosen))

    def grid(self) -> dict[str, list[Any]]:
        return {key: dim.grid() for key, dim in self.space.items()}

    @property
    def sampler(self) -> str:
        if self.study.sampler != "auto":
            return self.study.sampler
        return "nsga2" if len(self.study.objectives) > 1 else "tpe"

    @property
    def n_trials(self) -> int:
        if self.study.n_trials is not None:
            return self.study.n_trials
        if self.sampler == "grid":
            return math.prod(len(values) for values in self.grid().values())
        raise ValueError("study.n_trials is required unless the sampler is grid")

    def check_space(self) -> None:
        """Build trial configs from the ends of every range and every choice.

        Raises:
            ConfigError: naming the space key whose values do not make a valid config.
        """
        base = self.base_values()
        parse_config(base)
        problems = []
        for key, dim in self.space.items():
            for value in dim.probe_values():
                try:
                    parse_config(apply_overrides(base, {key: value}))
                except ConfigError as err:
                    detail = str(err).split("\n", 1)[-1].strip()
                    problems.append(f"  space.{key} = {value!r}: {detail}")
                    break
        if self.sampler == "grid":
            try:
                self.grid()
            except ValueError as err:
                problems.append(f"  space: {err}")
        reference = self.report.reference
        if reference is not None and reference not in self.methods():
            problems.append(
                f"  report.reference: '{reference}' is not a method this sweep runs "
                f"({', '.join(sorted(self.methods()))})"
            )
        if problems:
            raise ConfigError("invalid sweep space:\n" + "\n".join(problems))

    def methods(self) -> set[str]:
        """The methods the sweep's trials can run: the base config's and the space's."""
        found = {parse_config(self.base_values()).compression.method}
        for key, dim in self.space.items():
            if key == "compression.method":
                found |= {str(v) for v in dim.probe_values()}
            elif key == "compression":
                found |= {v["method"] for v in dim.probe_values() if isinstance(v, dict)}
        return found


def _format(err: ValidationError, path: Path) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        lines.append(f"  {field}: {item['msg'].removeprefix('Value error, ')}")
    return f"invalid sweep file '{path}':\n" + "\n".join(lines)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read, override and validate a sweep file (the base config and the space included).

    Raises:
        ConfigError: naming the offending field for any problem.
    """
    path = Path(path)
    values = apply_overrides(read_yaml(path, "sweep file"), overrides or {})
    base = values.get("base")
    if isinstance(base, str) and not Path(base).is_absolute():
        values["base"] = str((path.parent / base).resolve())
    try:
        spec = SweepSpec.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format(err, path)) from None
    if not spec.base.is_file():
        raise ConfigError(f"invalid sweep file '{path}':\n  base: '{spec.base}' does not exist")
    spec.check_space()
    return spec


def sweep_name(path: Path) -> str:
    """The name in a sweep file (its study and MLflow experiment), read without validating the
    rest of it.

    Raises:
        ConfigError: for a missing or unreadable file, or a name that is not one.
    """
    values = read_yaml(path, "sweep file")
    try:
        return check_name(str(values.get("name", "")), "name")
    except ValueError as err:
        raise ConfigError(f"sweep file '{path}': {err}") from None


def dump_spec(spec: SweepSpec) -> str:
    """The validated sweep as YAML (logged with the sweep's MLflow run), password masked."""
    values = spec.model_dump(mode="json", by_alias=True)
    values["study"]["storage"] = masked_url(spec.study.storage)
    return yaml.safe_dump(values, sort_keys=False)
