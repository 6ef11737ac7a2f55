"""Power-of-two and additive-power-of-two codebooks.

With ``P = {0} ∪ {2^k : k = -b .. ceil(log2 M) - 1}``, the order-``p`` centres are the sums of
``p`` elements of ``P`` (with replacement) no larger than ``M``, mirrored. Because ``0 ∈ P``
every order contains the lower ones. Every centre is an integer multiple of ``2^-b``, which lets
the fixing engine map intervals onto centre indices with a lookup table instead of a search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

MAX_ORDER = 4


@dataclass(frozen=True)
class Codebook:
    """Sorted centres with the lowest order at which each appears.

    Args:
        values: Sorted, distinct centres (float64, exact sums of powers of two).
        orders: Order of each centre (1 for 0 and plain powers of two).
        b: The smallest power of two is ``2^-b``; all centres are multiples of it.
    """

    values: np.ndarray
    orders: np.ndarray
    b: int

    def __len__(self) -> int:
        return len(self.values)

    def up_to(self, order: int) -> Codebook:
        """The centres of order ``<= order``."""
        keep = self.orders <= order
        return Codebook(self.values[keep], self.orders[keep], self.b)

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Centres as a float32 tensor (exact: at most four significant bits each)."""
        return torch.tensor(self.values, dtype=torch.float32, device=device)

    def grid(self) -> np.ndarray:
        """Centres in units of ``2^-b`` (integers)."""
        return np.rint(self.values * 2.0**self.b).astype(np.int64)

    def index_of(self, value: float) -> int:
        """Position of ``value`` (which must be a centre) in :attr:`values`."""
        position = int(np.searchsorted(self.values, value))
        if position >= len(self.values) or self.values[position] != value:
            raise KeyError(f"{value} is not a centre")
        return position


@lru_cache(maxsize=64)
def _positive_sums(b: int, top_exponent: int, max_order: int) -> tuple[np.ndarray, np.ndarray]:
    powers = np.array([0.0] + [2.0**k for k in range(-b, top_exponent + 1)])
    sums, orders = np.array([0.0]), np.array([1])
    for order in range(1, max_order + 1):
        candidates = np.unique((sums[:, None] + powers[None, :]).ravel())
        new = np.setdiff1d(candidates, sums, assume_unique=True)
        sums = np.concatenate([sums, new])
        orders = np.concatenate([orders, np.full(len(new), order)])
    keep = np.argsort(sums)
    return sums[keep], orders[keep]


def pow2_codebook(b: int, max_abs: float, max_order: int = MAX_ORDER) -> Codebook:
    """Centres of orders ``1..max_order`` for weights with ``max |w| = max_abs``.

    Args:
        b: Smallest power of two is ``2^-b``.
        max_abs: ``M``, the largest magnitude among the weights to fix; no centre exceeds it.
        max_order: Largest number of powers of two summed (1..4).
    """
    if not 1 <= max_order <= MAX_ORDER:
        raise ValueError(f"max_order must be in 1..{MAX_ORDER}, got {max_order}")
    top_exponent = math.ceil(math.log2(max_abs)) - 1 if max_abs > 0 else -b - 1
    sums, orders = _positive_sums(b, top_exponent, max_order)
    keep = sums <= max_abs
    sums, orders = sums[keep], orders[keep]
    values = np.concatenate([-sums[:0:-1], sums])
    all_orders = np.concatenate([orders[:0:-1], orders])
    return Codebook(values, all_orders, b)
