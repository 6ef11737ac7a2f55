"""Batched loaders with seeded, per-epoch shuffling: in-memory tensors, or image files.

Both share one interface (``set_epoch``, ``num_samples``, ``dataset_size``, ``to``, ``len``),
so the training loop, the methods and ``torchrun`` sharding treat them alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

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


class _NormalisingCollate:
    """Stack ``uint8`` images and normalise them in one pass, inside a worker (single-threaded,
    so the training process keeps its cores)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.scale, self.shift = scale, shift

    def __call__(self, samples: list) -> Batch:
        images, labels = default_collate(samples)
        return torch.addcmul(self.shift, images, self.scale), labels


class FolderLoader:
    """A DataLoader over image files with per-epoch seeded shuffling (same API as TensorLoader).

    Workers decode, crop and flip. For a GPU they send ``uint8`` batches (a quarter of the
    bytes of float ones, pinned, copied non-blocking) that are normalised on the device in one
    pass; for the CPU they normalise after collating, in the same single pass, so the training
    process's threads do not compete with them. Workers stay alive between epochs and keep
    ``prefetch_factor`` batches each in flight.
    Sharded (under ``torchrun``), a ``DistributedSampler`` gives each rank its share.

    Args:
        dataset: Yields ``(uint8 CHW image, label)``; see ``mean``/``std``.
        batch_size: Samples per batch.
        shuffle: Reshuffle each epoch.
        seed: Base seed of the shuffling.
        num_workers: Decoding processes (0: in this process).
        shard: Under ``torchrun``, give each rank an equal share of every epoch's samples.
        mean: Per-channel mean of the ``[0, 1]`` images, subtracted on the device.
        std: Per-channel standard deviation, divided out on the device.
        prefetch_factor: Batches each worker prepares ahead.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int,
        shard: bool = False,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        prefetch_factor: int = 4,
    ) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.batch_size, self.shuffle, self.num_workers = batch_size, shuffle, num_workers
        self.prefetch_factor = prefetch_factor
        self.generator = torch.Generator()
        self.sampler = None
        if shard and world_size() > 1:
            self.sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=True)
        self.device = torch.device("cpu")
        # uint8 x * scale + shift == (x / 255 - mean) / std
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._affine = (
            1.0 / (255.0 * std_t),
            -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t,
        )
        self._device_affine = self._affine
        self._loader: DataLoader | None = None

    @property
    def _on_device(self) -> bool:
        """Whether batches are normalised on the device rather than in the workers."""
        return self.device.type != "cpu"

    @property
    def loader(self) -> DataLoader:
        """The underlying DataLoader, built for the current device (pinned memory on CUDA)."""
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                shuffle=self.shuffle and self.sampler is None,
                sampler=self.sampler,
                num_workers=workers,
                generator=self.generator,
                pin_memory=self.device.type == "cuda",
                collate_fn=None if self._on_device else _NormalisingCollate(*self._affine),
                persistent_workers=workers > 0,
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
            )
        return self._loader

    def to(self, device: torch.device | str) -> FolderLoader:
        device = torch.device(device)
        if device != self.device:
            self.device, self._loader = device, None
            self._device_affine = tuple(t.to(device) for t in self._affine)
        return self

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
        if not self._on_device:
            yield from self.loader
            return
        scale, shift = self._device_affine
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            # One pass from uint8 to the normalised float batch (type promotion in addcmul).
            yield torch.addcmul(shift, images, scale), labels


Loader = TensorLoader | FolderLoader
