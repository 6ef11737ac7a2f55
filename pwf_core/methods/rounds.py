"""Round-based methods: train the free weights, fix up to the round's fraction, evaluate.

PWFN, WFN, k-means and uniform quantisation are all this: a schedule of fractions, a flat view
of the network's converted weights (:class:`FlatWeights`) and a method-specific :meth:`fix`.
"""

from __future__ import annotations

import itertools
import math
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch
from pydantic import ConfigDict, field_validator
from torch import nn

from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.bayes import bayesian_params, fixed_masks
from pwf_core.distributed import is_main
from pwf_core.methods.base import (
    ECE,
    TOP1,
    Column,
    Method,
    Step,
    StepContext,
    StepRecord,
    integer,
)
from pwf_core.metrics import weight_sharing_metrics
from pwf_core.registry import MethodConfig
from pwf_core.train import TrainingHooks, train

PAPER_SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
SUMMARY_COLUMNS = ["step", "centre", "order", "threshold", "count"]
FIXED = Column("ws/fixed_fraction", "fixed", lambda v: f"{100 * v:.1f} %")
UNIQUE_FIXED = Column("ws/unique_fixed_values", "unique values", integer)


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


def nearest_centres(
    values: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest of the sorted ``centres`` for each value, and its distance."""
    upper = torch.searchsorted(centres, values).clamp_(1, len(centres) - 1)
    lower = upper - 1
    pick_upper = (centres[upper] - values).abs() < (values - centres[lower]).abs()
    index = torch.where(pick_upper, upper, lower)
    return index, (centres[index] - values).abs()


@torch.no_grad()
def projected_values(weights: FlatWeights, centres: torch.Tensor) -> int:
    """How many distinct values the network would hold if every free weight were fixed now to
    its nearest centre: mid-run, a far better guess of the final count than the codebook so far
    (early rounds fix the small weights, most of them to 0)."""
    centres = centres.to(weights.mu.device, weights.mu.dtype)
    free = weights.mu[~weights.fixed]
    if len(free) and len(centres) > 1:
        free = centres[nearest_centres(free, centres)[0]]
    elif len(free):
        free = centres.expand(len(free))
    return int(torch.cat([weights.mu[weights.fixed], free]).unique().numel())


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


def _with_shared_counts(metrics: dict[str, float]) -> dict[str, float]:
    """Add the values the fixed weights share (``ws/shared_values``) and the weights that
    share none (``ws/outliers``: none, for a fixing method)."""
    return metrics | {"ws/shared_values": metrics["ws/unique_fixed_values"], "ws/outliers": 0.0}


class FixingMethod(Method):
    """A round-based method: train the free weights, fix up to the round's fraction, evaluate.

    Subclasses implement :meth:`fix`.
    """

    config: FixingConfig
    table_columns: ClassVar[tuple[Column, ...]] = (FIXED, UNIQUE_FIXED, TOP1, ECE)

    def plan(self) -> list[Step]:
        schedule = self.config.schedule
        return [
            Step(index=i, stage="round", number=i + 1, of=len(schedule), fraction=fraction)
            for i, fraction in enumerate(schedule)
        ]

    def describe(self, metrics: Mapping[str, float], step: Step | None = None) -> list[str]:
        """``60.0 % fixed``, ``31 values`` (the codebook so far) after a round."""
        parts = []
        if "ws/fixed_fraction" in metrics:
            parts.append(f"{100 * metrics['ws/fixed_fraction']:.1f} % fixed")
        if "ws/unique_fixed_values" in metrics:
            parts.append(f"{int(metrics['ws/unique_fixed_values'])} values")
        return parts

    def summary_line(self, metrics: Mapping[str, float]) -> str:
        return (
            f"top-1 {100 * metrics['cls/acc']:.2f} % with {int(metrics['ws/unique_values'])} "
            f"unique values ({100 * metrics['ws/fixed_fraction']:.0f} % of weights fixed)"
        )

    @staticmethod
    def sharing_metrics(model: nn.Module) -> dict[str, float]:
        """``ws/*`` of the network, with the counts every method reports alike."""
        return _with_shared_counts(weight_sharing_metrics(model))

    def finalize(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        return _with_shared_counts(super().finalize(model, ctx))

    def training_hooks(self, model: nn.Module) -> TrainingHooks | None:
        """What the method adds to the training between rounds (WFN: its regulariser)."""
        return None

    def projection_centres(self, weights: FlatWeights) -> torch.Tensor | None:
        """The sorted centres the free weights are headed for, for ``ws/projected_values``
        (``None``: the method cannot say before it fixes them)."""
        return None

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
            ctx.train.epochs_before(step.index),
            device=ctx.device,
            fixed_masks=fixed_masks(model),
            hooks=self.training_hooks(model),
            epoch_offset=1000 * step.index,
            progress=ctx.progress_for(step),
        )
        start = time.perf_counter()
        summary = pd.DataFrame(columns=SUMMARY_COLUMNS)
        projected: dict[str, float] = {}
        if is_main():  # one rank decides the fixing; the others receive it
            weights = FlatWeights.gather(model)
            summary = self.fix(weights, fixed_target(step.fraction, len(weights)), step.index)
            weights.scatter_(model)
            centres = self.projection_centres(weights)
            if centres is not None:
                projected["ws/projected_values"] = float(projected_values(weights, centres))
        self.synchronise(model)
        fix_seconds = time.perf_counter() - start
        metrics = {**ctx.evaluate(model), **self.sharing_metrics(model), **self.step_metrics()}
        metrics |= projected
        metrics |= {
            "train/loss": trained.mean_loss,
            "train/steps": float(trained.steps),
            "time/train_s": trained.seconds,
            "time/fix_s": fix_seconds,
            "time/eval_s": time.perf_counter() - start - fix_seconds,
        }
        return StepRecord(step, metrics, summary)
