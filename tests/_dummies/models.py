"""Models small enough to check by hand, and a researcher's own models (not registered)."""

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


class SignalNet(nn.Module):
    """A user's 1-D conv net for 2-channel signals of length 32 (4 classes)."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, width, 5, padding=2)
        self.bn = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=2))


class VolumeNet(nn.Module):
    """A user's 3-D conv net for 1x4x4x4 volumes (2 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def signal_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy signals of 4 classes: the sign of channel 0's offset and of channel 1's first half."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 32, generator=generator)
    first = torch.randint(0, 2, (n,), generator=generator)
    second = torch.randint(0, 2, (n,), generator=generator)
    x[:, 0] += 0.8 * (2 * first[:, None] - 1)
    x[:, 1, :16] += 0.8 * (2 * second[:, None] - 1)
    return x, first + 2 * second


def train_plainly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """An ordinary training loop (what a researcher did before reaching for pwf)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(y), 32):
            loss = nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
