"""What a method is: convert a model, run a plan of steps, finalize.

Every method follows one life cycle, whoever drives it (:func:`pwf_core.compress` in a
notebook, the Prefect flow one task per step):

1. :meth:`Method.convert` turns conv/linear weights into (mu, sigma) pairs and initialises them;
2. :meth:`Method.plan` lists the steps (PWFN: one per fixing round);
3. :meth:`Method.run_step` runs one step and returns a :class:`StepRecord` of metrics;
4. :meth:`Method.finalize` leaves the model eval-ready and returns the final metrics.

A step is a pure function of the model it receives, the seed and its own position (it reseeds
from them), so a run resumed from step ``k - 1``'s checkpoint ends exactly where an
uninterrupted run ends. What a method carries between steps is in :meth:`Method.state_dict`.

:class:`FixingMethod` is the base of the round-based methods (PWFN, WFN, k-means, uniform): each
step trains the free weights, fixes more of them, and evaluates.
"""

from __future__ import annotations

import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
from pydantic import ConfigDict, field_validator
from torch import nn

from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.bayes import (
    ConversionReport,
    bayesian_params,
    fixed_masks,
    set_sampling,
    to_bayesian,
)
from pwf_core.config import TrainConfig
from pwf_core.distributed import broadcast_run_state, is_main
from pwf_core.metrics import evaluate, weight_sharing_metrics
from pwf_core.registry import MethodConfig
from pwf_core.train import TrainingHooks, train

PAPER_SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
SUMMARY_COLUMNS = ["step", "centre", "order", "threshold", "count"]


class FixingConfig(MethodConfig):
    """Knobs every round-based method has; each method extends it with its own.

    Args:
        method: The method's name (``pwfn``, ``wfn``, ``kmeans``, ``uniform``).
        schedule: Fraction of converted weights fixed after each round; strictly increasing,
            in (0, 1], ending at 1.0.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schedule: tuple[float, ...] = PAPER_SCHEDULE

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, schedule: tuple[float, ...]) -> tuple[float, ...]:
        if not schedule:
            raise ValueError("schedule is empty")
        if any(not 0.0 < f <= 1.0 for f in schedule):
            raise ValueError(f"every fraction must be in (0, 1]; got {list(schedule)}")
        if any(b <= a for a, b in itertools.pairwise(schedule)):
            raise ValueError(f"schedule must be strictly increasing; got {list(schedule)}")
        if not math.isclose(schedule[-1], 1.0):
            raise ValueError(
                f"schedule must end at 1.0 so every weight is fixed; got {schedule[-1]}"
            )
        return schedule


def fixed_target(fraction: float, total: int) -> int:
    """Weights that must be fixed after a round with schedule fraction ``fraction``."""
    return min(total, math.ceil(fraction * total))


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

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def evaluate(
        self, model: nn.Module, mc_samples: int = 0, average: str = "probs"
    ) -> dict[str, float]:
        """``cls/*`` and ``cal/*`` on the eval loader (empty without one)."""
        if self.eval_loader is None:
            return {}
        return evaluate(model, self.eval_loader, self.device, mc_samples, average)


class Method(TrainingHooks, ABC):
    """Base of every method: convert, plan, steps, finalize, and resumable state.

    Subclasses set :attr:`config_class` (whose ``method`` literal is the method's name) and
    implement :meth:`plan` and :meth:`run_step`; register them with
    :func:`pwf_core.registry.register_method`.

    Args:
        config: The method's frozen config.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: Whether weights are sampled while training (and the final model has sampled metrics).
    bayesian: ClassVar[bool] = False
    #: Which parameters of conv/linear layers become (mu, sigma) pairs.
    converted: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.method

    def convert(self, model: nn.Module) -> ConversionReport:
        """Convert conv/linear layers to (mu, sigma) and initialise them (once per run)."""
        report = to_bayesian(model, attrs=self.converted)
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

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Shape a converted model so that a checkpoint's ``tensors`` load into it."""

    @abstractmethod
    def plan(self) -> list[Step]:
        """The steps of a run, in order."""

    @abstractmethod
    def run_step(self, model: nn.Module, step: Step, ctx: StepContext) -> StepRecord:
        """Run ``step`` on ``model`` (edited in place) and measure the result."""

    def prediction(self) -> tuple[int, str]:
        """How the final model predicts: forward passes averaged, and what is averaged.

        A fixed model is deterministic (one pass); a stochastic one averages samples.
        """
        return 0, "probs"

    def finalize(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Leave ``model`` eval-ready (sampling off) and return its final metrics.

        Bayesian methods add the metrics of ``ctx.mc_samples`` averaged weight samples under
        ``*_mc`` keys.
        """
        set_sampling(model, False)
        model.eval()
        metrics = {**ctx.evaluate(model), **weight_sharing_metrics(model)}
        if self.bayesian and ctx.mc_samples > 0 and ctx.eval_loader is not None:
            seed_everything(derive_seed(ctx.seed, "final-eval"))
            sampled = ctx.evaluate(model, mc_samples=ctx.mc_samples)
            metrics |= {f"{key}_mc": value for key, value in sampled.items()}
        return metrics

    def step_metrics(self) -> dict[str, float]:
        """Method-specific values recorded with every step (e.g. PWFN's resolved ``b``)."""
        return {}

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

    def synchronise(self, model: nn.Module) -> None:
        """Under ``torchrun``: make every rank's model and state rank 0's (after rank 0 alone
        changed them, and after training, whose norm statistics differ between ranks)."""
        broadcast_run_state(model, self)


@dataclass
class FlatWeights:
    """The converted parameters of a whole network as flat tensors (one global view).

    Args:
        mu: Means, ``(N,)``.
        sigma: Standard deviations, ``(N,)``.
        fixed: Fixed mask, ``(N,)`` bool.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    fixed: torch.Tensor

    @classmethod
    @torch.no_grad()
    def gather(cls, model: nn.Module) -> FlatWeights:
        """Copy the model's converted means, sigmas and fixed masks into flat tensors."""
        params = bayesian_params(model)
        return cls(
            mu=torch.cat([p.mu.detach().flatten().float() for p in params]),
            sigma=torch.cat([p.sigma.detach().flatten().float() for p in params]),
            fixed=torch.cat([p.fixed_mask.flatten() for p in params]),
        )

    @torch.no_grad()
    def scatter_(self, model: nn.Module) -> None:
        """Write the flat tensors back into the model's parameters and mask buffers."""
        offset = 0
        for p in bayesian_params(model):
            n = p.mu.numel()
            p.mu.copy_(self.mu[offset : offset + n].view_as(p.mu))
            p.sigma.copy_(self.sigma[offset : offset + n].view_as(p.sigma))
            p.fixed_mask.copy_(self.fixed[offset : offset + n].view_as(p.fixed_mask))
            offset += n

    def __len__(self) -> int:
        return self.mu.numel()

    @property
    def num_fixed(self) -> int:
        return int(self.fixed.sum())


class FixingMethod(Method):
    """A round-based method: train the free weights, fix up to the round's fraction, evaluate.

    Subclasses implement :meth:`fix`.
    """

    config: FixingConfig

    def plan(self) -> list[Step]:
        schedule = self.config.schedule
        return [
            Step(index=i, stage="round", number=i + 1, of=len(schedule), fraction=fraction)
            for i, fraction in enumerate(schedule)
        ]

    @abstractmethod
    def fix(self, weights: FlatWeights, target_fixed: int, round_index: int) -> pd.DataFrame:
        """Fix free weights in place until ``target_fixed`` are fixed.

        Returns:
            One row per greedy step: ``step, centre, order, threshold, count``.
        """

    def run_step(self, model: nn.Module, step: Step, ctx: StepContext) -> StepRecord:
        seed_everything(derive_seed(ctx.seed, "round", step.index))
        assert step.fraction is not None
        trained = train(
            model,
            ctx.train_loader,
            ctx.train,
            epochs=ctx.train.epochs_before(step.index),
            device=ctx.device,
            fixed_masks=fixed_masks(model),
            hooks=self,
            progress=ctx.progress,
            desc=str(step),
            epoch_offset=1000 * step.index,
            log=ctx.log,
        )
        start = time.perf_counter()
        summary = pd.DataFrame(columns=SUMMARY_COLUMNS)
        if is_main():  # one rank decides the fixing; the others receive it
            weights = FlatWeights.gather(model)
            summary = self.fix(weights, fixed_target(step.fraction, len(weights)), step.index)
            weights.scatter_(model)
        self.synchronise(model)
        fix_seconds = time.perf_counter() - start
        metrics = {**ctx.evaluate(model), **weight_sharing_metrics(model), **self.step_metrics()}
        metrics |= {
            "train/loss": trained.mean_loss,
            "train/steps": float(trained.steps),
            "time/train_s": trained.seconds,
            "time/fix_s": fix_seconds,
            "time/eval_s": time.perf_counter() - start - fix_seconds,
        }
        return StepRecord(step, metrics, summary)
