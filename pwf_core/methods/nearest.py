"""Fixing to a fixed codebook, nearest weights first: the engine of the k-means and uniform
baselines. The codebook is learnt once, at the first round, and kept for the later ones."""

from __future__ import annotations

from abc import abstractmethod

import pandas as pd
import torch

from pwf_core.methods.rounds import SUMMARY_COLUMNS, FixingMethod, FlatWeights, nearest_centres


def fix_nearest_first(
    weights: FlatWeights, target_fixed: int, centres: torch.Tensor, relative: bool = False
) -> pd.DataFrame:
    """Fix the free weights closest to their nearest centre until ``target_fixed`` are fixed.

    Args:
        weights: Flat means, sigmas and fixed mask; edited in place.
        target_fixed: Fixed weights after the call.
        centres: Sorted codebook.
        relative: Rank by ``|w - c| / |w|`` instead of ``|w - c|``.

    Returns:
        One row per centre that received weights (threshold = the largest distance accepted).
    """
    remaining = target_fixed - weights.num_fixed
    if remaining <= 0:
        return pd.DataFrame([], columns=SUMMARY_COLUMNS)
    free = (~weights.fixed).nonzero().squeeze(1)
    mu = weights.mu[free]
    centres = centres.to(mu.device, mu.dtype)
    index, distance = nearest_centres(mu, centres)
    if relative:
        distance = distance / mu.abs().clamp_min(torch.finfo(mu.dtype).tiny)
    if remaining < len(free):
        keep = torch.sort(distance, stable=True).indices[:remaining]
        free, index, distance = free[keep], index[keep], distance[keep]
    weights.mu[free] = centres[index]
    weights.fixed[free] = True
    used, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
    worst = torch.zeros(len(used), dtype=distance.dtype, device=distance.device)
    worst.scatter_reduce_(0, inverse, distance, reduce="amax")
    rows = [
        (step, float(centres[int(k)]), 0, float(d), int(n))
        for step, (k, d, n) in enumerate(
            zip(used.tolist(), worst.tolist(), counts.tolist(), strict=True)
        )
    ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


class CodebookMethod(FixingMethod):
    """A method whose codebook is learnt from all converted weights at the first round."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.codebook: torch.Tensor | None = None

    @abstractmethod
    def build_codebook(self, values: torch.Tensor) -> torch.Tensor:
        """Sorted codebook for the network's converted weights ``values``."""

    def projection_centres(self, weights: FlatWeights) -> torch.Tensor | None:
        return self.codebook

    def fix(self, weights: FlatWeights, target_fixed: int, round_index: int) -> pd.DataFrame:
        if self.codebook is None:
            self.codebook = self.build_codebook(weights.mu).sort().values
        return fix_nearest_first(weights, target_fixed, self.codebook)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.codebook is None else {"codebook": self.codebook.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.codebook = state.get("codebook")
