"""CIFAR-100 from its python files (``train`` and ``test`` in ``cifar-100-python/``), read by
CIFAR-10's unpickler, which admits only arrays, lists and bytes. Labels are the 100 fine
classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pwf_core.data.cifar10 import read_cifar_batch
from pwf_core.data.contract import InputContract
from pwf_core.data.splits import ImageDataset, tensor_dataset
from pwf_core.errors import DatasetError

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# The fine classes' names are in the dataset's meta file, which pwf does not read: a model's
# contract says "class k" for them (None) rather than names it cannot vouch for.
CONTRACT = InputContract(
    shape=(3, 32, 32),
    raw_range=(0.0, 255.0),
    divide_by=255.0,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)
_WHAT = "CIFAR-100 python file"


def load_cifar100_dataset(folder: Path, val_fraction: float) -> ImageDataset:
    """CIFAR-100 from ``train`` and ``test`` in ``folder`` (or its ``cifar-100-python/``)."""
    if (folder / "cifar-100-python").is_dir():
        folder = folder / "cifar-100-python"
    missing = [name for name in ("train", "test") if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-100 folder '{folder}' lacks {missing}")
    train_images, train_labels = read_cifar_batch(folder / "train", b"fine_labels", _WHAT, 100)
    test_images, test_labels = read_cifar_batch(folder / "test", b"fine_labels", _WHAT, 100)

    def as_tensors(images: np.ndarray, labels: np.ndarray):
        return CONTRACT.normalise(torch.tensor(images)), torch.tensor(labels)

    return tensor_dataset(
        "cifar100",
        *as_tensors(train_images, train_labels),
        *as_tensors(test_images, test_labels),
        val_fraction,
        num_classes=100,
        augment="crop_flip",
        contract=CONTRACT,
    )
