"""Sigma initialisation from the relative distance to the nearest powers of two.

The sigma regulariser is part of the sampling op's backward: see
:func:`pwf_core.bayes.add_sigma_regulariser_` and :func:`pwf_core.bayes.set_sigma_regulariser`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pwf_core.bayes import SIGMA_CAP, SIGMA_FLOOR, bayesian_params

PRIOR_SCALE = 0.0025
DEFAULT_REG = 2.0**-11


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of a 1-D tensor of any size.

    ``torch.quantile`` refuses inputs above 2^24 elements; this uses ``kthvalue`` instead.
    """
    n = values.numel()
    position = q * (n - 1)
    lower, upper = math.floor(position), math.ceil(position)
    low = torch.kthvalue(values, lower + 1).values
    if upper == lower:
        return low
    high = torch.kthvalue(values, upper + 1).values
    return low + (high - low) * (position - lower)


def pow2_relative_distance(mu: torch.Tensor) -> torch.Tensor:
    """``r = |(mu - up)/mu| * |(mu - dn)/mu|`` for the powers of two ``dn <= |mu| <= up``.

    Zero maps to 0 (the reference's log2(0) gave NaN); a value that is itself a power of two
    gives 0.
    """
    magnitude = mu.abs()
    nonzero = magnitude > 0
    safe = torch.where(nonzero, magnitude, torch.ones_like(magnitude))
    exponent = torch.log2(safe)
    up = torch.exp2(torch.ceil(exponent))
    down = torch.exp2(torch.floor(exponent))
    distance = ((safe - up) / safe).abs() * ((safe - down) / safe).abs()
    return torch.where(nonzero, distance, torch.zeros_like(distance))


def prior_sigma(mu: torch.Tensor, cap: float = SIGMA_CAP) -> torch.Tensor:
    """The paper's sigma init for one tensor: ``clamp(0.0025 r / q75(r), 2^-30, cap)``.

    Weights near a power of two start with a small sigma, those between two powers a large
    one. When every ``r`` is zero (all weights on powers of two) all sigmas are the minimum.
    """
    distance = pow2_relative_distance(mu.detach().float())
    finite = distance[torch.isfinite(distance)]
    scale = quantile(finite.flatten(), 0.75) if finite.numel() else torch.zeros(())
    if scale <= 0:
        sigma = torch.full_like(distance, SIGMA_FLOOR)
    else:
        sigma = (PRIOR_SCALE * distance / scale).clamp(SIGMA_FLOOR, cap)
    return sigma.to(mu.dtype)


@torch.no_grad()
def init_sigma_(
    model: nn.Module, prior: bool = True, constant: float = 1e-4, cap: float = SIGMA_CAP
) -> None:
    """Set the sigma of every converted tensor (weights and biases), per tensor, in place.

    Args:
        model: A model converted by :func:`pwf_core.bayes.to_bayesian`.
        prior: Use the power-of-two prior; otherwise every sigma is ``constant``.
        constant: Sigma without the prior (the reference used 1e-4).
        cap: Upper bound of the prior sigma.
    """
    for param in bayesian_params(model):
        if prior:
            param.sigma.copy_(prior_sigma(param.mu, cap))
        else:
            param.sigma.fill_(constant)
