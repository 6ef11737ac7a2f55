"""What a fixing method is, and the registry that finds one by name.

A method turns free weights into fixed ones, a round at a time. The round driver hands it the
whole network's converted weights as flat tensors (:class:`FlatWeights`) and the number of
weights that must be fixed after the round; the method edits the tensors in place and returns a
per-centre summary. Between rounds the method may add to training through
:class:`~pwf_core.train.TrainingHooks`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch
from torch import nn

from pwf_core.bayes import bayesian_params, set_sampling
from pwf_core.config import FixingConfig
from pwf_core.train import TrainingHooks

SUMMARY_COLUMNS = ["step", "centre", "order", "threshold", "count"]


def fixed_target(fraction: float, total: int) -> int:
    """Weights that must be fixed after a round with schedule fraction ``fraction``."""
    return min(total, math.ceil(fraction * total))


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


class FixingMethod(TrainingHooks, ABC):
    """Base of every method: config, preparation, one fixing round, and resumable state.

    Subclasses set :attr:`config_class` and implement :meth:`fix`.

    Args:
        config: The method's frozen config.
    """

    config_class: ClassVar[type[FixingConfig]] = FixingConfig
    #: Whether weights are sampled while training between rounds.
    bayesian: ClassVar[bool] = False

    def __init__(self, config: FixingConfig) -> None:
        self.config = config

    def attach(self, model: nn.Module) -> None:
        """Configure a converted model for this method; called whenever one is built or loaded.

        Deterministic methods train with sampling off; Bayesian ones sample in train mode.
        """
        set_sampling(model, None if self.bayesian else False)

    def prepare(self, model: nn.Module) -> None:
        """Initialise a freshly converted model once, before the first round (e.g. sigma)."""

    @abstractmethod
    def fix(self, weights: FlatWeights, target_fixed: int, round_index: int) -> pd.DataFrame:
        """Fix free weights in place until ``target_fixed`` are fixed.

        Returns:
            One row per greedy step: ``step, centre, order, threshold, count``.
        """

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the method carries between rounds (e.g. k-means centroids)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


_METHODS: dict[str, type[FixingMethod]] = {}


def register_method(name: str) -> Callable[[type[FixingMethod]], type[FixingMethod]]:
    """Class decorator: make a :class:`FixingMethod` selectable as ``fixing.method: <name>``."""

    def decorate(method_class: type[FixingMethod]) -> type[FixingMethod]:
        _METHODS[name] = method_class
        return method_class

    return decorate


def method_names() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def _method_class(name: str) -> type[FixingMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown fixing method '{name}'; known: {method_names()}")
    return _METHODS[name]


def method_config_class(name: str) -> type[FixingConfig]:
    """The config class of method ``name`` (validates the ``fixing`` section)."""
    return _method_class(name).config_class


def create_method(config: FixingConfig) -> FixingMethod:
    """Instantiate the method a fixing config names."""
    return _method_class(config.method)(config)
