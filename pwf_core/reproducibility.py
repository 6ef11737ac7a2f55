"""Seeds: one experiment seed, derived per stage.

Every stage (pretraining, each fixing round) reseeds from ``derive_seed(seed, stage...)`` when it
starts, so its random numbers depend on the experiment seed and its own inputs only: a stage
resumed from a checkpoint, or run after a cached stage, draws exactly what an uninterrupted run
would have drawn, without carrying RNG state between stages.
"""

from __future__ import annotations

import hashlib
import random

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
