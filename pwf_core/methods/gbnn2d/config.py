"""2DGBNN's knobs (the ``compression`` section when ``method: 2dgbnn``)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from pwf_core.registry import MethodConfig
from pwf_core.types import NonNegativeFloat, PositiveFloat, PositiveInt

# ``tau_w: auto`` makes the largest this share of the weights (by |mu|) outliers.
AUTO_TAU_W_SHARE = 0.001


class TwoDGBNNConfig(MethodConfig):
    """2DGBNN knobs.

    Args:
        bnn_epochs: Epochs of mean-field BNN training.
        vi_epochs: Epochs of VI over the shared Gaussians (merging after each but the last).
        bnn_lr: Adam learning rate of the BNN's means.
        bnn_sigma_lr: Adam learning rate of the BNN's sigmas.
        vi_lr: Adam learning rate of the Gaussians, outliers, biases and norms in VI.
        sigma_init: Initial sigma of every weight in the BNN.
        sigma_min: Sigmas are clamped to at least this after every step.
        prior_sigma: Scale of the BNN's Gaussian prior, centred on the pretrained weights.
        kl_weight: Multiplies the KL term (1 is the ELBO).
        gaussians: ``K`` for k-means, or ``auto``: ``round(sqrt(N))`` for ``N`` weights,
            at most 6000 (237 for the small CNN, 3346 for ResNet-18).
        tau_w: Weights with ``|mu| >= tau_w`` are outliers. A number is an absolute
            threshold (the paper's 0.2). ``auto``: the 99.9th percentile of ``|mu|`` over all
            converted weights (``AUTO_TAU_W_SHARE``), so that the largest 0.1 % are outliers
            on any network whatever its weights' scale. Why that share: the authors'
            ResNet-18 on CIFAR-10 kept 123,310 outliers of 11.17 M weights (1.10 %), of
            which the gradient rule's 1 % is a fixed share, so 0.2 on those small weights
            caught about the largest 0.1 %. A quantile keeps that share exactly; a multiple
            of a robust scale (median or MAD) would not, since the share beyond
            ``c * scale`` depends on the tails' shape, which differs between networks.
        grad_outlier_fraction: Share of weights, by gradient magnitude, that are outliers.
        min_cluster_size: Members of clusters with at most this many points are outliers.
        tau_d: Largest squared W2 distance of a merged pair.
        tau_g: Largest mean member gradient of a merged Gaussian (``None``: no limit).
        tau_v: Largest variance of a merged Gaussian's member means.
        merge_neighbours: Nearest Gaussians each one is compared with for merging.
        step_samples: Forward passes averaged when measuring after each step.
        eval_samples: Forward passes averaged for the final model (S).
    """

    method: Literal["2dgbnn"] = "2dgbnn"
    bnn_epochs: PositiveInt = 4
    vi_epochs: PositiveInt = 4
    bnn_lr: PositiveFloat = 1e-4
    bnn_sigma_lr: PositiveFloat = 1e-3
    vi_lr: PositiveFloat = 1e-3
    sigma_init: PositiveFloat = 1e-3
    sigma_min: PositiveFloat = 1e-6
    prior_sigma: PositiveFloat = 0.01
    kl_weight: NonNegativeFloat = 1.0
    gaussians: int | str = "auto"
    tau_w: float | str = "auto"
    grad_outlier_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    min_cluster_size: int = Field(20, ge=0)
    tau_d: NonNegativeFloat = 1e-6
    tau_g: NonNegativeFloat | None = None
    tau_v: NonNegativeFloat = 1e-3
    merge_neighbours: int = Field(3, ge=1, le=32)
    step_samples: PositiveInt = 8
    eval_samples: PositiveInt = 30

    @field_validator("gaussians")
    @classmethod
    def _gaussians(cls, value: int | str) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto'; got {value!r}")

    @field_validator("tau_w")
    @classmethod
    def _tau_w(cls, value: float | str) -> float | str:
        if value == "auto" or (isinstance(value, float) and 0 < value < math.inf):
            return value
        raise ValueError(f"must be a positive finite number or 'auto'; got {value!r}")
