"""Seeds: one experiment seed, derived per stage.

Every stage (pretraining, each step of a method) reseeds from ``derive_seed(seed, stage...)``
when it starts, so its random numbers depend on the experiment seed and its own inputs only: a
stage resumed from a checkpoint, or run after a cached stage, draws exactly what an
uninterrupted run would have drawn, without carrying RNG state between stages.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 31-bit seed from the experiment seed and stage keys: ``derive_seed(0, "round", 3)``."""
    text = ":".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block that seeds and draws from the global generators, then put them back.

    A library call must not change the caller's random stream: Python's, NumPy's, torch's
    CPU generator and every CUDA device's are restored on exit.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
