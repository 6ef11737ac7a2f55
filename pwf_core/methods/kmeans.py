"""Global k-means weight sharing (Deep Compression style) as a baseline."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pwf_core._seeding import derive_seed
from pwf_core.methods.nearest import CodebookMethod
from pwf_core.methods.rounds import FixingConfig
from pwf_core.registry import register_method


class KMeansConfig(FixingConfig):
    """Args:
    clusters: Codebook size K (shared values for the whole network).
    iterations: Lloyd iterations at most.
    fit_samples: Weights sampled to fit the centroids (all of them when fewer).
    seed: Seed of that sample, with the run's own (replicates draw different samples).
    """

    method: Literal["kmeans"] = "kmeans"
    clusters: int = Field(32, ge=2, le=65536)
    iterations: int = Field(50, ge=1)
    fit_samples: int = Field(1 << 20, ge=1)
    seed: int = 0


def kmeans_1d(
    values: torch.Tensor,
    clusters: int,
    iterations: int = 50,
    fit_samples: int = 1 << 20,
    seed: int = 0,
) -> torch.Tensor:
    """Lloyd's k-means on scalars with Deep Compression's linear initialisation.

    In one dimension the assignment is a search among the midpoints of the sorted centroids,
    and the update a pair of bincounts, so each iteration is linear in the samples.
    """
    values = values.detach().flatten().float()
    if values.numel() > fit_samples:
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(values.numel(), generator=generator)[:fit_samples]
        values = values[picked.to(values.device)]
    centroids = torch.linspace(
        float(values.min()), float(values.max()), clusters, device=values.device
    )
    for _ in range(iterations):
        midpoints = (centroids[1:] + centroids[:-1]) / 2
        assignment = torch.searchsorted(midpoints, values)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=clusters)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.unique()


@register_method
class KMeans(CodebookMethod):
    """K shared values from global k-means; weights fixed nearest-first over the schedule."""

    config_class = KMeansConfig
    size_knob = "compression.clusters"
    size_knob_fields = ("clusters",)
    config: KMeansConfig

    def build_codebook(self, values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # The round reseeded torch from the run's seed: a replicate fits on its own sample.
        seed = derive_seed(cfg.seed, torch.initial_seed())
        return kmeans_1d(values, cfg.clusters, cfg.iterations, cfg.fit_samples, seed)
