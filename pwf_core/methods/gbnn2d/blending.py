"""Blended weights: members that lie outside their Gaussian's 95 % ellipse take a mix of their
two most likely Gaussians' values (the paper's alpha-blending)."""

from __future__ import annotations

import torch

from pwf_core.methods.gbnn2d.gaussians import CHI2_95_2D, CHUNK, log_density, mahalanobis_squared
from pwf_core.methods.gbnn2d.sharing import SharedGaussians

BLEND_CANDIDATES = 8  # Gaussians on each side (by mean mu) considered for a blended point


@torch.no_grad()
def assign_blends(sharing: SharedGaussians, points: torch.Tensor) -> None:
    """Blend every member outside its Gaussian's 95 % ellipse between its two most likely
    Gaussians, with ``alpha = softmax(log densities)``.

    Ellipses and densities are those of the Gaussians fitted to the members (the priors).
    The candidates of a point are the ``2 * BLEND_CANDIDATES`` Gaussians nearest to it in
    mu, where the likely ones are (the means are spread along mu).
    """
    factors = sharing.fitted_factors()
    centres = sharing.prior_means
    members = (sharing.member >= 0).nonzero().squeeze(1)
    own = sharing.member[members]
    outside = []
    for start in range(0, len(members), CHUNK):
        chunk, labels = members[start : start + CHUNK], own[start : start + CHUNK]
        distance = mahalanobis_squared(points[chunk], centres[labels], factors[labels])
        outside.append(chunk[distance > CHI2_95_2D])
    index = torch.cat(outside) if outside else members[:0]
    order = torch.argsort(centres[:, 0])
    sorted_mu = centres[order, 0].contiguous()
    width = min(BLEND_CANDIDATES, sharing.num_gaussians)
    position = torch.searchsorted(sorted_mu, points[index, 0].contiguous())
    low = (position - width).clamp(0, max(sharing.num_gaussians - 2 * width, 0))
    candidates = order[
        (low[:, None] + torch.arange(2 * width, device=low.device)).clamp(
            max=sharing.num_gaussians - 1
        )
    ]
    densities = log_density(points[index][:, None, :], centres[candidates], factors[candidates])
    top, which = densities.topk(min(2, densities.shape[1]), dim=1)
    if top.shape[1] < 2:  # a single Gaussian: nothing to blend with
        index, top, which = index[:0], top[:0], which[:0]
    pair = candidates.gather(1, which)
    sharing.blend_index = index
    sharing.blend_pair = pair
    sharing.blend_alpha = torch.softmax(top, dim=1)[:, 0].contiguous()
