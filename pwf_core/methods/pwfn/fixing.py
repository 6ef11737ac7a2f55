"""PWFN: probabilistic weight fixing (Subia-Waud & Dasmahapatra, NeurIPS 2023).

Each round fixes free weights to power-of-two / additive-power-of-two centres, choosing by the
sigma-scaled distance ``|c - mu| / max(sigma, 2^-20)``. The greedy step takes the centre with
the most free weights within threshold ``t`` and fixes them nearest first up to the quota; when
no centre has any, the round relaxes, alternately raising the order and multiplying ``t`` by
``inc``.

How it stays fast at tens of millions of weights (no dense centres x weights matrix): at a
given ``(order, t)`` the centres a weight may join form a contiguous index range ``[a, b)`` of
the sorted codebook. Because every centre is a multiple of ``2^-b``, ``a`` and ``b`` come from a
lookup table indexed by ``ceil(lo * 2^b)`` / ``floor(hi * 2^b)`` (one gather per weight, no
search). Per-centre counts are a difference array over the ranges (two bincounts and a cumsum).
A greedy step scans only the weights that reach some centre at this level, and fixing its
members decrements the counts of just the centres their ranges covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from pwf_core.bayes import bayesian_params, set_sigma_regulariser
from pwf_core.methods.pwfn.codebook import Codebook, pow2_codebook
from pwf_core.methods.pwfn.variance import DEFAULT_REG, SIGMA_CAP, init_sigma_, quantile
from pwf_core.methods.rounds import SUMMARY_COLUMNS, FixingConfig, FixingMethod, FlatWeights
from pwf_core.registry import register_method
from pwf_core.types import NonNegativeFloat, PositiveFloat

SIGMA_DISTANCE_FLOOR = 2.0**-20


class PWFNConfig(FixingConfig):
    """PWFN knobs (defaults are the paper's).

    Args:
        prior: Initialise sigma from the distance to powers of two; else ``sigma_init``.
        sigma_init: Constant initial sigma when ``prior`` is off.
        reg: Strength of the sigma regulariser (0 turns it off).
        reg_cap: Sigma the regulariser pushes toward.
        b: Smallest power of two is ``2^-b``; ``|mu| < 2^-b`` counts as zero under zero-fix.
            It decides the number of unique values more than any other knob. ``auto`` puts
            ``2^-b`` at the median weight magnitude (:func:`auto_b`): 5 for pwf's small CNN on
            digits, 6-7 for ImageNet ResNets (the paper's 7).
        threshold: Starting threshold ``t`` of every round, or one value per round.
        inc: Factor by which ``t`` grows when a round relaxes.
        max_order: Most powers of two summed into one centre (1-4).
        sigma_join: Sigma of newly fixed weights: the std of the means that joined the centre
            (``std_mu``), unchanged (``keep``), or divided by 10 (``divide_by_10``).
        zero_fix: Send every weight with ``|mu| < 2^-b`` to 0.
    """

    method: Literal["pwfn"] = "pwfn"
    prior: bool = True
    sigma_init: PositiveFloat = 1e-4
    reg: NonNegativeFloat = DEFAULT_REG
    reg_cap: PositiveFloat = SIGMA_CAP
    b: int | str = 7
    threshold: PositiveFloat | tuple[PositiveFloat, ...] = 1.0
    inc: float = Field(2.0, gt=1.0)
    max_order: int = Field(4, ge=1, le=4)
    sigma_join: Literal["std_mu", "keep", "divide_by_10"] = "std_mu"
    zero_fix: bool = True

    @field_validator("b")
    @classmethod
    def _b_in_range(cls, b: int | str) -> int | str:
        if b == "auto" or (isinstance(b, int) and 1 <= b <= 20):
            return b
        raise ValueError(f"must be an integer from 1 to 20, or 'auto'; got {b!r}")

    @model_validator(mode="after")
    def _threshold_per_round(self) -> PWFNConfig:
        if isinstance(self.threshold, tuple) and len(self.threshold) != len(self.schedule):
            raise ValueError(
                f"threshold has {len(self.threshold)} values but the schedule has "
                f"{len(self.schedule)} rounds"
            )
        return self

    def threshold_for(self, round_index: int) -> float:
        """Starting threshold of round ``round_index``."""
        if isinstance(self.threshold, tuple):
            return self.threshold[round_index]
        return self.threshold


class CentreLookup:
    """Maps value intervals ``[lo, hi]`` to index ranges ``[a, b)`` of a codebook's centres.

    Every centre is an integer ``g`` times ``2^-b``, so ``#centres < lo`` is
    ``#{g <= ceil(lo 2^b) - 1}`` and ``#centres <= hi`` is ``#{g <= floor(hi 2^b)}``: a table of
    ``#{g <= j}`` over the integer range of the codebook answers both with one gather.
    """

    def __init__(self, codebook: Codebook, device: torch.device) -> None:
        grid = codebook.grid()
        self.scale = 2.0**codebook.b
        self.base = int(grid[0]) - 1
        self.top = int(grid[-1])
        positions = np.arange(self.base, self.top + 1)
        dtype = torch.int16 if len(grid) < 2**15 else torch.int32
        counts = np.searchsorted(grid, positions, side="right")
        self.table = torch.tensor(counts, dtype=dtype, device=device)

    def ranges_(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a = #centres < lo`` and ``b = #centres <= hi`` per interval (``lo``/``hi`` are
        overwritten: at tens of millions of weights every temporary costs page faults)."""
        lower = lo.mul_(self.scale).clamp_(self.base + 1, self.top + 1).ceil_().sub_(1 + self.base)
        upper = hi.mul_(self.scale).clamp_(self.base, self.top).floor_().sub_(self.base)
        return self.table[lower.to(torch.int32)], self.table[upper.to(torch.int32)]


def _coverage(a: torch.Tensor, b: torch.Tensor, num_centres: int) -> torch.Tensor:
    """How many ranges ``[a_i, b_i)`` cover each centre index (a difference array)."""
    delta = torch.bincount(a, minlength=num_centres + 1)
    delta -= torch.bincount(b, minlength=num_centres + 1)
    return delta.cumsum(0)[:num_centres]


class _MembersByCentre:
    """The (weight, centre) eligibility pairs of one level, grouped by centre (CSR).

    Most weights reach 0-3 centres, so the pairs are few; sorting them by centre (a radix sort
    of small integers) lets each greedy step read just the chosen centre's candidates.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, num_centres: int) -> None:
        lengths = (b - a).clamp_min_(0)
        if int(lengths.max()) <= 1:
            position = lengths.nonzero().squeeze(1)
            centre = a[position]
        else:
            position = torch.repeat_interleave(lengths.long())
            first = torch.cumsum(lengths, 0) - lengths
            step = torch.arange(len(position), device=a.device) - first[position]
            centre = a[position] + step
        order = torch.sort(centre, stable=True).indices
        self.position = position[order]
        counts = torch.bincount(centre, minlength=num_centres)
        self.counts = counts
        self.offsets = [0, *torch.cumsum(counts, 0).tolist()]

    def candidates(self, k: int) -> torch.Tensor:
        """Positions of the weights that could join centre ``k`` (fixed ones included)."""
        return self.position[self.offsets[k] : self.offsets[k + 1]]


class _Relaxation:
    """The order/threshold walk: (1,t) → (2,t) → (2,2t) → (3,2t) → (3,4t) → (4,4t) → (4,8t) …"""

    def __init__(self, threshold: float, inc: float, max_order: int) -> None:
        self.order, self.threshold = 1, threshold
        self.inc, self.max_order = inc, max_order
        self._raise_order_next = True

    def relax(self) -> None:
        if self._raise_order_next and self.order < self.max_order:
            self.order += 1
            self._raise_order_next = False
        else:
            self.threshold *= self.inc
            self._raise_order_next = True


def interval_bounds(
    mu: torch.Tensor, scale: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[mu - t s, mu + t s]``: the centres a weight may join at threshold ``t``.

    ``scale`` is ``max(sigma, 2^-20)``. This is the eligibility rule ``|c - mu| / s <= t``
    written as an interval, evaluated in the weights' dtype.
    """
    reach = scale * threshold
    return mu - reach, reach.add_(mu)


def _check_progress(
    walk: _Relaxation, remaining: int, mu: torch.Tensor, scale: torch.Tensor
) -> None:
    """Fail, rather than relax forever, after a level that fixed nothing although it could.

    At the highest order, once ``t * min(scale) > 2 max|mu|`` every free weight reaches every
    centre, so such a level without progress means the inputs (or the code) are broken; a
    threshold that overflows means the same.
    """
    smallest = float(scale.min())
    if smallest <= 0:
        raise RuntimeError(
            f"PWFN round: a distance scale is {smallest:g}; sigmas must be floored at 2^-20"
        )
    reach = walk.threshold * smallest
    spread = 2 * float(mu.abs().max()) + 1.0
    if not math.isfinite(reach) or (walk.order >= walk.max_order and reach > spread):
        raise RuntimeError(
            f"PWFN round made no progress at order {walk.order}, threshold {walk.threshold:g} "
            f"with {remaining} weights still to fix (smallest distance scale {smallest:g}); "
            "sigmas must be positive and finite"
        )


def pwfn_fix_round(
    weights: FlatWeights,
    target_fixed: int,
    threshold: float = 1.0,
    inc: float = 2.0,
    b: int = 7,
    max_order: int = 4,
    zero_fix: bool = True,
    sigma_join: str = "std_mu",
) -> pd.DataFrame:
    """One PWFN fixing round on the whole network's free weights, in place.

    Each relaxation level ``(order, t)`` starts from the full codebook of that order for the
    weights still free (``M`` = their largest magnitude); within a level a centre, once chosen,
    has no eligible free weight left, so it is not picked again.

    Args:
        weights: Flat means, sigmas and fixed mask; edited in place.
        target_fixed: Number of fixed weights after the round (``ceil(f_r N)``).
        threshold: Starting threshold ``t`` of the round.
        inc: Growth factor of ``t`` when relaxing.
        b: Smallest power of two is ``2^-b``.
        max_order: Largest order the relaxation reaches.
        zero_fix: Weights with ``|mu| < 2^-b`` may only join 0, at distance 0.
        sigma_join: ``std_mu``, ``keep`` or ``divide_by_10``.

    Returns:
        One row per greedy step: ``step, centre, order, threshold, count``.
    """
    remaining = target_fixed - weights.num_fixed
    rows: list[tuple] = []
    if remaining <= 0:
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    free = _FreeWeights.of(weights, b if zero_fix else None)
    walk = _Relaxation(threshold, inc, max_order)
    while remaining > 0:
        at_level_start = remaining
        free.compact()
        level = _Level.build(free, b, walk)
        while remaining > 0:
            k = int(level.counts.argmax())
            if int(level.counts[k]) <= 0:
                break
            members = free.nearest(level, k, remaining)
            free.join(weights, members, level.centres[k], sigma_join)
            level.counts -= _coverage(level.a[members], level.b[members], len(level.book))
            remaining -= len(members)
            value = float(level.book.values[k])
            rows.append((len(rows), value, int(level.book.orders[k]), walk.threshold, len(members)))
        if remaining > 0:
            if remaining == at_level_start:
                _check_progress(walk, remaining, free.mu, free.scale)
            walk.relax()
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


@dataclass
class _FreeWeights:
    """The weights still free in a round: their positions in the flat view, means, distance
    scales, zero-fix flags, and which of them the current level has not fixed yet."""

    index: torch.Tensor
    mu: torch.Tensor
    scale: torch.Tensor
    is_zero: torch.Tensor
    alive: torch.Tensor

    @classmethod
    def of(cls, weights: FlatWeights, zero_fix_b: int | None) -> _FreeWeights:
        index = (~weights.fixed).nonzero().squeeze(1)
        mu = weights.mu[index]
        scale = weights.sigma[index].clamp_min_(SIGMA_DISTANCE_FLOOR)
        if not torch.isfinite(mu.sum() + scale.sum()):  # a reduction: no full-size temporary
            raise ValueError("free weights hold NaN or infinite means or sigmas; cannot fix them")
        if zero_fix_b is None:
            is_zero = torch.zeros_like(mu, dtype=torch.bool)
        else:
            is_zero = mu.abs() < 2.0**-zero_fix_b
        return cls(index, mu, scale, is_zero, torch.ones_like(mu, dtype=torch.bool))

    def compact(self) -> None:
        """Drop the weights the previous level fixed."""
        if self.alive.all():
            return
        keep = self.alive.nonzero().squeeze(1)
        self.index, self.mu = self.index[keep], self.mu[keep]
        self.scale, self.is_zero = self.scale[keep], self.is_zero[keep]
        self.alive = torch.ones_like(self.mu, dtype=torch.bool)

    def nearest(self, level: _Level, k: int, quota: int) -> torch.Tensor:
        """The free candidates of centre ``k``, nearest first when more than ``quota``."""
        members = level.pairs.candidates(k)
        members = members[self.alive[members]]
        if len(members) == 0:
            raise RuntimeError(
                f"PWFN round: centre {float(level.book.values[k])} counts "
                f"{int(level.counts[k])} free weights but has none; the candidate bookkeeping "
                "is inconsistent"
            )
        if len(members) > quota:
            centre = level.centres[k]
            distance = (centre - self.mu[members]).abs_().div_(self.scale[members])
            distance.masked_fill_(self.is_zero[members] & (centre == 0), 0.0)
            members = members[torch.sort(distance, stable=True).indices[:quota]]
            members = members.sort().values
        return members

    def join(
        self, weights: FlatWeights, members: torch.Tensor, centre: torch.Tensor, sigma_join: str
    ) -> None:
        """Fix ``members`` to ``centre``, their sigma set by the sigma-join rule."""
        joined = self.index[members]
        if sigma_join == "std_mu":
            weights.sigma[joined] = self.mu[members].std(correction=0) if len(joined) > 1 else 0.0
        elif sigma_join == "divide_by_10":
            weights.sigma[joined] /= 10
        weights.mu[joined] = centre
        weights.fixed[joined] = True
        self.alive[members] = False


@dataclass
class _Level:
    """One relaxation level ``(order, t)``: its codebook, each free weight's centre range
    ``[a, b)``, the eligibility pairs by centre, and each centre's count of free weights."""

    book: Codebook
    centres: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    pairs: _MembersByCentre
    counts: torch.Tensor

    @classmethod
    def build(cls, free: _FreeWeights, b: int, walk: _Relaxation) -> _Level:
        device = free.mu.device
        low, high = torch.aminmax(free.mu)
        book = pow2_codebook(b, max(-float(low), float(high)), walk.order)
        zero_index = book.index_of(0.0)
        bounds = interval_bounds(free.mu, free.scale, walk.threshold)
        start, stop = CentreLookup(book, device).ranges_(*bounds)
        start.masked_fill_(free.is_zero, zero_index)
        stop.masked_fill_(free.is_zero, zero_index + 1)
        pairs = _MembersByCentre(start, stop, len(book))
        return cls(book, book.tensor(device), start, stop, pairs, pairs.counts)


def auto_b(model: nn.Module) -> int:
    """``round(-log2(median |w|))`` over the converted conv/linear weights, in [1, 20]."""
    weights = [p.mu.detach().flatten() for p in bayesian_params(model) if p.attr == "weight"]
    magnitude = torch.cat(weights).abs().float()
    median = float(quantile(magnitude, 0.5))
    if median <= 0:
        return 20
    return int(min(20, max(1, round(-math.log2(median)))))


@register_method(default=True)
class PWFN(FixingMethod):
    """Probabilistic weight fixing: sigma-scaled greedy fixing to (additive) powers of two."""

    config_class = PWFNConfig
    bayesian = True
    size_knob = (
        "compression.b (smallest power of two 2^-b: lower b, fewer values) and "
        "compression.max_order"
    )
    size_knob_fields = ("b", "max_order")
    config: PWFNConfig

    def __init__(self, config: PWFNConfig) -> None:
        super().__init__(config)
        self.b: int | None = None if config.b == "auto" else int(config.b)

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        set_sigma_regulariser(model, self.config.reg, self.config.reg_cap)

    def initialise(self, model: nn.Module) -> None:
        init_sigma_(model, prior=self.config.prior, constant=self.config.sigma_init)
        if self.b is None:
            self.b = auto_b(model)

    def step_metrics(self) -> dict[str, float]:
        return {"pwfn/b": float(self.b)} if self.b is not None else {}

    def size_knobs(self) -> dict[str, str]:
        knobs = super().size_knobs()
        return knobs | ({"b": str(self.b)} if self.b is not None else {})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"b": torch.tensor(self.b)} if self.b is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "b" in state:
            self.b = int(state["b"])

    def projection_centres(self, weights: FlatWeights) -> torch.Tensor | None:
        free = weights.mu[~weights.fixed]
        if self.b is None or not len(free):
            return None
        book = pow2_codebook(self.b, float(free.abs().max()), self.config.max_order)
        return book.tensor(weights.mu.device)

    def fix(self, weights: FlatWeights, target_fixed: int, round_index: int) -> pd.DataFrame:
        assert self.b is not None, "initialise() resolves b: auto before the first round"
        return pwfn_fix_round(
            weights,
            target_fixed,
            threshold=self.config.threshold_for(round_index),
            inc=self.config.inc,
            b=self.b,
            max_order=self.config.max_order,
            zero_fix=self.config.zero_fix,
            sigma_join=self.config.sigma_join,
        )
