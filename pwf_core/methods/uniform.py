"""Uniform symmetric k-bit quantisation as a baseline."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pwf_core.methods.nearest import CodebookMethod
from pwf_core.methods.rounds import FixingConfig
from pwf_core.registry import register_method


class UniformConfig(FixingConfig):
    """Args:
    bits: Levels are ``step * {-(2^(bits-1) - 1), ..., 2^(bits-1) - 1}`` (0 included).
    """

    method: Literal["uniform"] = "uniform"
    bits: int = Field(4, ge=2, le=16)


def uniform_levels(max_abs: float, bits: int) -> torch.Tensor:
    """The ``2^bits - 1`` symmetric levels spanning ``[-max_abs, max_abs]``."""
    half = 2 ** (bits - 1) - 1
    return torch.arange(-half, half + 1, dtype=torch.float32) * (max_abs / half)


@register_method
class Uniform(CodebookMethod):
    """A uniform grid over the network's weight range; weights fixed nearest-first."""

    config_class = UniformConfig
    size_knob = "compression.bits"
    size_knob_fields = ("bits",)
    config: UniformConfig

    def build_codebook(self, values: torch.Tensor) -> torch.Tensor:
        return uniform_levels(float(values.abs().max()), self.config.bits).to(values.device)
