"""Batched loaders with seeded, per-epoch shuffling: in-memory tensors, or image files.

Both share one interface (``set_epoch``, ``num_samples``, ``dataset_size``, ``to``, ``len``),
so the training loop, the methods and ``torchrun`` sharding treat them alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pwf_core.distributed import rank, world_size

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorLoader:
    """Mini-batches from in-memory tensors, optionally kept on the training device.

    Shuffling is a function of ``(seed, epoch)`` only, so a resumed run sees the same batches.

    Args:
        images: ``(N, C, H, W)`` float tensor, already normalised.
        labels: ``(N,)`` int64 tensor.
        batch_size: Samples per batch.
        shuffle: Reshuffle each epoch.
        seed: Base seed of the shuffling.
        augment: ``"crop_flip"`` for random 4-pixel-padded crops and horizontal flips.
        shard: Under ``torchrun``, give each rank an equal share of every epoch's samples.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: str | None = None,
        shard: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.augment = batch_size, shuffle, seed, augment
        self.epoch = 0
        self.rank, self.world = (rank(), world_size()) if shard else (0, 1)

    def to(self, device: torch.device | str) -> TensorLoader:
        """Move the whole dataset to ``device`` (cheap for the small datasets held here)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling order of ``epoch``."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this process sees per epoch (every rank the same number)."""
        return len(self.labels) // self.world

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split, over every rank."""
        return len(self.labels)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n, size = self.num_samples, self.batch_size
        if not self.shuffle and self.world == 1:
            for start in range(0, n, size):
                yield self.images[start : start + size], self.labels[start : start + size]
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.labels), generator=generator)
        if not self.shuffle:
            order = torch.arange(len(self.labels))
        order = order[self.rank :: self.world][:n].to(self.labels.device)
        for start in range(0, n, size):
            picked = order[start : start + size]
            images = self.images[picked]
            if self.augment == "crop_flip":
                images = _crop_flip(images, generator)
            yield images, self.labels[picked]


def _crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


class FolderLoader:
    """A DataLoader over image files with per-epoch seeded shuffling (same API as TensorLoader).

    Sharded (under ``torchrun``), a ``DistributedSampler`` gives each rank its share.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int,
        shard: bool = False,
    ) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.generator = torch.Generator()
        self.sampler = None
        if shard and world_size() > 1:
            self.sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=True)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and self.sampler is None,
            sampler=self.sampler,
            num_workers=num_workers,
            generator=self.generator,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )

    def to(self, device: torch.device | str) -> FolderLoader:
        return self  # batches are moved by the training loop

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        if self.sampler is not None:
            return self.sampler.num_samples
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split, over every rank."""
        return len(self.dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(self.loader)


Loader = TensorLoader | FolderLoader
