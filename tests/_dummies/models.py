"""Models small enough to check by hand."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two linear layers around a LayerNorm (which must stay deterministic)."""

    def __init__(self, in_features: int = 4, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))
