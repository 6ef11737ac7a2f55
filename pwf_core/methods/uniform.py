"""Uniform symmetric k-bit quantisation as a baseline."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pwf_core.config import FixingConfig
from pwf_core.methods.base import register_method
from pwf_core.methods.nearest import CodebookMethod


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


@register_method("uniform")
class Uniform(CodebookMethod):
    """A uniform grid over the network's weight range; weights fixed nearest-first."""

    config_class = UniformConfig
    config: UniformConfig

    def build_codebook(self, values: torch.Tensor) -> torch.Tensor:
        return uniform_levels(float(values.abs().max()), self.config.bits).to(values.device)
