"""WFN: weight fixing networks (Subia-Waud & Dasmahapatra, ECCV 2022), the deterministic
predecessor of PWFN, as a baseline.

Distances are relative, ``|w - c| / |w|``; weights with ``|w| < 2^-b`` go to 0 at distance 0.
Centres come from a geometric ladder whose rungs are approximated by sums of powers of two.
Each weight's candidate is its nearest centre; the greedy step takes the centre that is nearest
for the most weights and accepts its weights, nearest first, while their running mean distance
stays within ``delta``.
"""

from __future__ import annotations

import math
from typing import Literal

import pandas as pd
import torch
from pydantic import Field
from torch import nn

from pwf_core.bayes import bayesian_params
from pwf_core.methods.nearest import fix_nearest_first
from pwf_core.methods.rounds import (
    SUMMARY_COLUMNS,
    FixingConfig,
    FixingMethod,
    FlatWeights,
    nearest_centres,
)
from pwf_core.registry import register_method
from pwf_core.train import TrainingHooks
from pwf_core.types import NonNegativeFloat

WFN_SCHEDULE = (0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0)
MAX_TERMS = 8


class WFNConfig(FixingConfig):
    """Args:
    delta: Largest accepted mean relative distance; also the ladder's step and the
        precision of each rung's power-of-two approximation.
    b: Ladder starts at ``2^-b``; smaller magnitudes are fixed to 0.
    reg_strength: Regulariser weight as a share of the cross-entropy (0 turns it off).
    reg_temperature: Temperature of the softmin over centres in the regulariser.
    reg_neighbours: Centres on each side of a weight that enter the regulariser's softmin.
    """

    method: Literal["wfn"] = "wfn"
    schedule: tuple[float, ...] = WFN_SCHEDULE
    delta: float = Field(0.015, gt=0.0, lt=1.0)
    b: int = Field(7, ge=1, le=20)
    reg_strength: NonNegativeFloat = 0.4
    reg_temperature: float = Field(0.05, gt=0.0)
    reg_neighbours: int = Field(4, ge=1, le=64)


def _nearest_power_of_two(x: float) -> float:
    return math.copysign(2.0 ** round(math.log2(abs(x))), x)


def wfn_codebook(max_abs: float, delta: float, b: int = 7) -> torch.Tensor:
    """Sorted WFN centres: ladder rungs ``m_{k+1} = m_k (1+delta)/(1-delta)`` from ``2^-b`` to
    ``max_abs``, each approximated by powers of two until the residual is below ``delta m``;
    mirrored, with 0."""
    centres = {0.0}
    rung = 2.0**-b
    while rung <= max_abs:
        approximation = 0.0
        for _ in range(MAX_TERMS):
            residual = rung - approximation
            if abs(residual) < delta * rung:
                break
            approximation += _nearest_power_of_two(residual)
        centres.update((approximation, -approximation))
        rung *= (1 + delta) / (1 - delta)
    return torch.tensor(sorted(centres), dtype=torch.float32)


def wfn_fix_round(
    weights: FlatWeights, target_fixed: int, centres: torch.Tensor, delta: float, b: int
) -> pd.DataFrame:
    """One WFN round in place; falls back to nearest-first when the accepted prefixes fall
    short of the quota (the final round must fix everything)."""
    remaining = target_fixed - weights.num_fixed
    rows: list[tuple] = []
    if remaining <= 0:
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    centres = centres.to(weights.mu.device)
    zero_index = int(torch.searchsorted(centres, torch.tensor(0.0, device=centres.device)))
    free = (~weights.fixed).nonzero().squeeze(1)
    mu = weights.mu[free]
    index, distance = nearest_centres(mu, centres)
    distance = distance / mu.abs().clamp_min(torch.finfo(mu.dtype).tiny)
    tiny = mu.abs() < 2.0**-b
    index = torch.where(tiny, zero_index, index)
    distance = torch.where(tiny, 0.0, distance)
    # Each weight competes for one centre only, so a centre's accepted prefix does not depend
    # on the others and the greedy order is simply by member count.
    order = torch.sort(distance, stable=True).indices
    order = order[torch.sort(index[order], stable=True).indices]
    sorted_index, sorted_distance = index[order], distance[order]
    counts = torch.bincount(sorted_index, minlength=len(centres))
    starts = counts.cumsum(0) - counts
    position = torch.arange(len(order), device=order.device) - starts[sorted_index]
    running = sorted_distance.cumsum(0)
    segment_base = torch.zeros(len(centres), dtype=running.dtype, device=running.device)
    firsts = starts[counts > 0]
    segment_base[counts > 0] = running[firsts] - sorted_distance[firsts]
    running_mean = (running - segment_base[sorted_index]) / (position + 1)
    # The prefix ends at the first weight whose running mean exceeds delta.
    over = running_mean > delta
    first_over = torch.full((len(centres),), len(order), device=order.device)
    first_over.scatter_reduce_(0, sorted_index[over], position[over], reduce="amin")
    accepted = torch.minimum(first_over, counts)
    step = 0
    for k in torch.argsort(counts, descending=True, stable=True).tolist():
        if remaining <= 0 or counts[k] == 0:
            break
        take = min(int(accepted[k]), remaining)
        if take == 0:
            continue
        chosen = order[int(starts[k]) : int(starts[k]) + take]
        weights.mu[free[chosen]] = centres[k]
        weights.fixed[free[chosen]] = True
        rows.append(
            (step, float(centres[k]), 0, float(sorted_distance[int(starts[k]) + take - 1]), take)
        )
        step += 1
        remaining -= take
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    if remaining > 0:
        fallback = fix_nearest_first(weights, target_fixed, centres, relative=True)
        fallback["step"] += step
        summary = pd.concat([summary, fallback], ignore_index=True)
    return summary


class _DistanceRegulariser(TrainingHooks):
    """WFN's loss term between rounds: free weights are drawn toward their nearest centres."""

    def __init__(self, config: WFNConfig, centres: torch.Tensor) -> None:
        self.config, self.centres = config, centres

    def extra_loss(self, model: nn.Module, task_loss: torch.Tensor) -> torch.Tensor | None:
        """``alpha * mean_i sum_c softmin_c(d_ic / T) d_ic`` over free weights, with
        ``alpha = strength * CE / reg`` (detached), i.e. the term is ``strength * CE`` in size.

        The softmin runs over the ``reg_neighbours`` nearest centres on each side, which hold
        nearly all of its mass, so memory stays linear in the weights.
        """
        cfg = self.config
        terms, count = [], 0
        for param in bayesian_params(model):
            w = param.mu[~param.fixed_mask]
            w = w[w.abs() >= 2.0**-cfg.b]
            if w.numel() == 0:
                continue
            centres_here = self.centres.to(w.device, w.dtype)
            upper = torch.searchsorted(centres_here, w.detach())
            offsets = torch.arange(-cfg.reg_neighbours, cfg.reg_neighbours, device=w.device)
            neighbour = (upper[:, None] + offsets).clamp_(0, len(centres_here) - 1)
            distance = (w[:, None] - centres_here[neighbour]).abs() / w.abs()[:, None]
            weight = torch.softmax(-distance / cfg.reg_temperature, dim=1)
            terms.append((weight * distance).sum())
            count += w.numel()
        if not terms:
            return None
        reg = torch.stack(terms).sum() / count
        return cfg.reg_strength * task_loss.detach() / reg.detach().clamp_min(1e-12) * reg


@register_method
class WFN(FixingMethod):
    """Weight fixing networks: relative-distance fixing to a power-of-two ladder."""

    config_class = WFNConfig
    size_knob = "compression.delta and compression.b"
    size_knob_fields = ("b", "delta")
    config: WFNConfig

    def __init__(self, config: WFNConfig) -> None:
        super().__init__(config)
        self.centres: torch.Tensor | None = None

    def _centres_for(self, model: nn.Module) -> torch.Tensor:
        if self.centres is None:
            max_abs = max(float(p.mu.detach().abs().max()) for p in bayesian_params(model))
            self.centres = wfn_codebook(max_abs, self.config.delta, self.config.b)
        return self.centres

    def initialise(self, model: nn.Module) -> None:
        self._centres_for(model)

    def training_hooks(self, model: nn.Module) -> TrainingHooks | None:
        if self.config.reg_strength == 0:
            return None
        return _DistanceRegulariser(self.config, self._centres_for(model))

    def projection_centres(self, weights: FlatWeights) -> torch.Tensor | None:
        return self.centres

    def fix(self, weights: FlatWeights, target_fixed: int, round_index: int) -> pd.DataFrame:
        assert self.centres is not None, "initialise() builds the centres before the first round"
        return wfn_fix_round(weights, target_fixed, self.centres, self.config.delta, self.config.b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.centres is None else {"centres": self.centres}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.centres = state.get("centres")
