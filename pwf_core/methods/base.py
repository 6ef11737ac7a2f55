"""What a method is: convert a model, run a plan of steps, finalize; and how it presents itself.

Every method follows one life cycle, whoever drives it (:func:`pwf_core.compress` in a
notebook, the Prefect flow one task per step):

1. :meth:`Method.convert` turns conv/linear weights into (mu, sigma) pairs and initialises them;
2. :meth:`Method.plan` lists the steps (PWFN: one per fixing round);
3. :meth:`Method.run_step` runs one step and returns a :class:`StepRecord` of metrics;
4. :meth:`Method.finalize` leaves the model eval-ready and returns the final metrics.

A step is a pure function of the model it receives, the seed and its own position (it reseeds
from them), so a run resumed from step ``k - 1``'s checkpoint ends exactly where an
uninterrupted run ends. What a method carries between steps is in :meth:`Method.state_dict`.

A method also owns what is particular about it wherever a run is shown: its part of a step's
one-line summary (:meth:`Method.describe`), the run's summary line and the knob that sets its
size (:meth:`Method.summary_line`, :attr:`Method.size_knob`), the columns of its step table
(:attr:`Method.table_columns`) and any figure of its own (:meth:`Method.figures`); the flows
ask, and never name a method.

The round-based methods (PWFN, WFN, k-means, uniform) share :mod:`pwf_core.methods.rounds`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.bayes import (
    ConversionReport,
    ModuleFilter,
    check_patterns,
    module_filter,
    set_sampling,
    to_bayesian,
)
from pwf_core.distributed import broadcast_run_state
from pwf_core.metrics import classification_metrics, predict_log_probs, weight_sharing_metrics
from pwf_core.registry import MethodConfig
from pwf_core.train import Progress, TrainConfig


@dataclass(frozen=True)
class Step:
    """One step of a method's plan.

    Args:
        index: Position in the whole plan, 0-based (checkpoints are numbered ``index + 1``).
        stage: What the step does: ``round`` for a fixing round, ``bnn``/``vi`` for epochs.
        number: Position within its stage, 1-based (what a person reads: "round 3/10").
        of: Steps in its stage.
        fraction: Share of converted weights fixed after the step (fixing methods).
    """

    index: int
    stage: str
    number: int
    of: int
    fraction: float | None = None

    def __str__(self) -> str:
        return f"{self.stage} {self.number}/{self.of}"


@dataclass
class StepRecord:
    """What one step did and how the model scored right after it.

    Args:
        step: The step.
        metrics: ``cls/*``, ``cal/*``, ``ws/*`` after the step, plus ``train/*`` and ``time/*``.
        table: Optional detail, e.g. one row per greedy fixing step (``centre, count, ...``).
    """

    step: Step
    metrics: dict[str, float]
    table: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def row(self) -> dict[str, Any]:
        """One history row: ``step``, ``stage``, ``round``, ``fraction`` and the metrics."""
        fraction = self.step.fraction if self.step.fraction is not None else math.nan
        return {
            "step": self.step.index + 1,
            "stage": self.step.stage,
            "round": self.step.number,
            "fraction": fraction,
            **self.metrics,
        }


def history(records: Iterable[StepRecord]) -> pd.DataFrame:
    """The records as a table, one row per step."""
    return pd.DataFrame([record.row() for record in records])


@dataclass
class StepContext:
    """What a step needs besides the model.

    Args:
        train_loader: Batches ``(inputs, targets)`` to train on.
        eval_loader: Batches to evaluate on after each step (``None``: no ``cls/*`` metrics).
        train: Optimiser and epochs of the training between steps.
        seed: The run's seed; each step reseeds from it and its own position.
        device: Where the model lives.
        progress: Progress bars on a terminal; ``log`` lines otherwise.
        log: Receives one line per epoch and per step (e.g. a logger's ``info``).
        mc_samples: Weight samples averaged for the final sampled metrics (0: none).
    """

    train_loader: Iterable
    eval_loader: Iterable | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    log: Callable[[str], None] | None = None
    mc_samples: int = 0

    #: The predictions behind the final headline metrics (set by ``evaluate(keep=True)``),
    #: so that a reliability diagram needs no second pass over the eval set.
    final_predictions: tuple[torch.Tensor, torch.Tensor] | None = None

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def progress_for(self, step: Step) -> Progress:
        """How the training of ``step`` reports itself."""
        return Progress(desc=str(step), bar=self.progress, log=self.log)

    def evaluate(
        self, model: nn.Module, mc_samples: int = 0, average: str = "probs", keep: bool = False
    ) -> dict[str, float]:
        """``cls/*`` and ``cal/*`` on the eval loader (empty without one).

        Args:
            keep: Remember these predictions as :attr:`final_predictions`.
        """
        if self.eval_loader is None:
            return {}
        predictions = predict_log_probs(model, self.eval_loader, self.device, mc_samples, average)
        if keep:
            self.final_predictions = predictions
        return classification_metrics(*predictions)


@dataclass(frozen=True)
class Column:
    """A column of a run's step table: the metric, its header, how a value reads.

    Args:
        key: The metric, e.g. ``ws/fixed_fraction``.
        label: The header a person reads.
        fmt: Turns a value into its cell (``"{:.1%}"``-style callables).
    """

    key: str
    label: str
    fmt: Callable[[float], str]


def prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``{"cls/acc": x}`` as ``{"<prefix>/cls/acc": x}``: one predictive's metrics among
    others (``mean/...``, ``sampled/...``)."""
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def integer(value: float) -> str:
    return f"{int(value)}"


TOP1 = Column("cls/acc", "top-1", percent)
ECE = Column("cal/ece", "ECE", lambda v: f"{v:.4f}")


@dataclass(frozen=True)
class Figure:
    """A figure a method adds to a run's plots.

    Args:
        name: The file's name without ``.png`` (``mixture``).
        kind: What is drawn, which the flows' plotting knows how to draw
            (``gaussian_mixture``); a kind is a type of plot, not a method.
        data: What the drawing needs.
    """

    name: str
    kind: str
    data: Mapping[str, Any]


class Method(ABC):
    """Base of every method: convert, plan, steps, finalize, and resumable state.

    Subclasses set :attr:`config_class` (whose ``method`` literal is the method's name) and
    implement :meth:`plan` and :meth:`run_step`; register them with
    :func:`pwf_core.registry.register_method`.

    Args:
        config: The method's frozen config.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: Whether weights are sampled while training.
    bayesian: ClassVar[bool] = False
    #: Whether the final model still samples its weights (2DGBNN's shared Gaussians), so that
    #: its sampled predictive is reported; a model whose every weight was fixed is
    #: deterministic, whatever sigmas it trained with.
    stochastic_final: ClassVar[bool] = False
    #: Which parameters of conv/linear layers become (mu, sigma) pairs.
    converted: ClassVar[tuple[str, ...]] = ("weight", "bias")
    #: The config knob(s) that turn the compressed size, for the run summary.
    size_knob: ClassVar[str] = ""
    #: The config fields that set the compressed size (their resolved values are recorded
    #: with every run, so that a comparison shows ``b=5`` where the config said ``auto``).
    size_knob_fields: ClassVar[tuple[str, ...]] = ()
    #: The columns of the run's step table (a Prefect artifact, the report).
    table_columns: ClassVar[tuple[Column, ...]] = (TOP1, ECE)

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.method

    def module_filter(self, filter_fn: ModuleFilter | None = None) -> ModuleFilter | None:
        """The layers this method's config (``include``/``exclude``) and ``filter_fn``
        select for conversion (``None``: all of them)."""
        return module_filter(self.config.include, self.config.exclude, filter_fn)

    def convert(self, model: nn.Module, filter_fn: ModuleFilter | None = None) -> ConversionReport:
        """Convert conv/linear layers to (mu, sigma) and initialise them (once per run).

        Args:
            model: The trained network.
            filter_fn: ``filter_fn(module, name) -> bool``: only the layers it accepts (and
                the config's ``include``/``exclude`` select) are converted.

        Raises:
            ValueError: when an ``include``/``exclude`` pattern names no layer of ``model``.
        """
        check_patterns(model, self.config.include, self.config.exclude)
        report = to_bayesian(model, attrs=self.converted, filter_fn=self.module_filter(filter_fn))
        if not report.converted:
            raise ValueError("no conv/linear layer is left to compress (see filter_fn)")
        self.attach(model)
        self.initialise(model)
        return report

    def attach(self, model: nn.Module) -> None:
        """Configure a converted model for this method; called whenever one is built or loaded.

        Deterministic methods train with sampling off; Bayesian ones sample in train mode.
        """
        set_sampling(model, None if self.bayesian else False)

    def initialise(self, model: nn.Module) -> None:
        """Initialise a freshly converted model once, before the first step (e.g. sigma)."""
        return None

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Shape a converted model so that a checkpoint's ``tensors`` load into it."""
        return None

    @abstractmethod
    def plan(self) -> list[Step]:
        """The steps of a run, in order."""

    @abstractmethod
    def run_step(self, model: nn.Module, step: Step, ctx: StepContext) -> StepRecord:
        """Run ``step`` on ``model`` (edited in place) and measure the result."""

    def finalize(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Leave ``model`` eval-ready (sampling off) and return its final metrics.

        The final metrics mean the same for every method: ``cls/*`` and ``cal/*`` are the
        model as it predicts (here: its mean weights), ``mean/cls/*`` and ``mean/cal/*`` those
        of its mean weights, and for a model that stays stochastic (:attr:`stochastic_final`)
        ``sampled/cls/*`` and ``sampled/cal/*`` those of ``ctx.mc_samples`` averaged weight
        samples.
        """
        set_sampling(model, False)
        model.eval()
        headline = ctx.evaluate(model, keep=True)
        metrics = {**headline, **prefixed("mean", headline), **weight_sharing_metrics(model)}
        if self.stochastic_final and ctx.mc_samples > 0 and ctx.eval_loader is not None:
            seed_everything(derive_seed(ctx.seed, "final-eval"))
            metrics |= prefixed("sampled", ctx.evaluate(model, mc_samples=ctx.mc_samples))
        return metrics

    def describe(self, metrics: Mapping[str, float], step: Step | None = None) -> list[str]:
        """The method's part of a one-line summary of a step (or, without ``step``, of the
        final model): ``["60.0 % fixed", "31 values"]``."""
        return []

    def summary_line(self, metrics: Mapping[str, float]) -> str:
        """What a person reads first about the final model."""
        parts = [f"top-1 {100 * metrics['cls/acc']:.2f} %", *self.describe(metrics)]
        return ", ".join(parts)

    def figures(self, model: nn.Module, seed: int) -> list[Figure]:
        """Figures of the final model particular to this method."""
        return []

    def step_metrics(self) -> dict[str, float]:
        """Method-specific values recorded with every step (e.g. PWFN's resolved ``b``)."""
        return {}

    def size_knobs(self) -> dict[str, str]:
        """The knobs that set the compressed size, as the run resolved them (``auto`` replaced
        by what it became once the model was converted): ``{"b": "5", "max_order": "4"}``."""
        return {name: str(getattr(self.config, name)) for name in self.size_knob_fields}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the method carries between steps (e.g. k-means centroids)."""
        return {}

    def state_bytes(self, num_converted: int) -> int:
        """Most bytes :meth:`state_dict` and any structure the method attaches to the model
        add to a checkpoint of a network with ``num_converted`` converted values (for the
        disk a run needs, before it starts)."""
        return 0

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None

    def synchronise(self, model: nn.Module) -> None:
        """Under ``torchrun``: make every rank's model and state rank 0's (after rank 0 alone
        changed them, and after training, whose norm statistics differ between ranks)."""
        broadcast_run_state(model, self)
