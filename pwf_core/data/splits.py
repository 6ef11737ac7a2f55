"""One dataset's splits and what a model must know of it (classes, channels, size)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from pwf_core.data.contract import InputContract
from pwf_core.data.loaders import FolderLoader, Loader, TensorLoader
from pwf_core.errors import DatasetError

SPLIT_SEED = 0  # Splits are fixed across experiment seeds so test sets stay comparable.


@dataclass
class TensorSplit:
    """One split held in memory: normalised images, labels, and the augmentation for training."""

    images: torch.Tensor
    labels: torch.Tensor
    augment: str | None = None


@dataclass
class ImageDataset:
    """Train/val/test splits of one dataset, with what a model needs to know about it.

    ``mean``/``std`` normalise the ``uint8`` images of file-backed splits on the device (the
    in-memory splits are stored normalised). ``contract`` says how a raw sample becomes the
    model's input (what an exported model records).
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    train: TensorSplit | Dataset
    val: TensorSplit | Dataset | None
    test: TensorSplit | Dataset
    num_workers: int = 0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    contract: InputContract | None = None

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> Loader:
        """A loader over ``split`` (``train``, ``val`` or ``test``); augmentation on train only.

        Under ``torchrun`` the training split is sharded between the ranks; every rank
        evaluates on the whole of the others.
        """
        source = getattr(self, split)
        if source is None:
            raise DatasetError(f"dataset '{self.name}' has no '{split}' split (val_fraction is 0)")
        shard = split == "train"
        if isinstance(source, TensorSplit):
            augment = source.augment if split == "train" else None
            return TensorLoader(
                source.images, source.labels, batch_size, shuffle, seed, augment, shard
            )
        return FolderLoader(
            source, batch_size, shuffle, seed, self.num_workers, shard, self.mean, self.std
        )


def split_indices(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(n * val_fraction)
    return order[n_val:], order[:n_val]


def check_labels(labels, num_classes: int, what: str) -> None:
    """Raise :class:`DatasetError` unless every label is a class index below ``num_classes``
    (a label out of range would crash the loss mid-training, far from the file it came from)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DatasetError(
            f"{what} run from {int(labels.min())} to {int(labels.max())}; "
            f"expected class indices 0 to {num_classes - 1}"
        )


def tensor_dataset(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    val_fraction: float,
    num_classes: int,
    augment: str | None = None,
    contract: InputContract | None = None,
) -> ImageDataset:
    train_idx, val_idx = split_indices(len(train_labels), val_fraction)

    def holder(images: torch.Tensor, labels: torch.Tensor, aug: str | None = None):
        return TensorSplit(images.contiguous(), labels.long().contiguous(), aug)

    return ImageDataset(
        name=name,
        num_classes=num_classes,
        in_chans=train_images.shape[1],
        img_size=train_images.shape[-1],
        train=holder(train_images[train_idx], train_labels[train_idx], augment),
        val=holder(train_images[val_idx], train_labels[val_idx]) if len(val_idx) else None,
        test=holder(test_images, test_labels),
        contract=contract,
    )
