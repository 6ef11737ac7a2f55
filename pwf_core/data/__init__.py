"""Datasets by name, read from local files only, and the config section that names one.

``digits`` (scikit-learn's 8x8 handwritten digits) ships with a package and is the default;
``mnist`` (IDX files, raw or gzipped), ``cifar10`` and ``cifar100`` (the python batches) and
``imagefolder`` (an ImageNet-style ``train/`` + ``val/`` tree) are read from ``data.path``.
Nothing is downloaded. Small datasets are held as tensors and batched without a DataLoader
(:mod:`~pwf_core.data.loaders`); each dataset has a reader module of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pwf_core.data.cifar10 import load_cifar10_dataset
from pwf_core.data.cifar100 import load_cifar100_dataset
from pwf_core.data.contract import InputContract, recorded_contract
from pwf_core.data.digits import load_digits_dataset
from pwf_core.data.imagefolder import load_imagefolder_dataset, read_image
from pwf_core.data.loaders import Batch, FolderLoader, Loader, TensorLoader
from pwf_core.data.mnist import load_mnist_dataset, read_idx
from pwf_core.data.splits import ImageDataset, TensorSplit
from pwf_core.errors import DatasetError
from pwf_core.types import NonNegativeInt, PositiveInt, Section

__all__ = [
    "Batch",
    "DataConfig",
    "DatasetError",
    "FolderLoader",
    "ImageDataset",
    "InputContract",
    "Loader",
    "TensorLoader",
    "TensorSplit",
    "load_dataset",
    "read_idx",
    "read_image",
    "recorded_contract",
]


class DataConfig(Section):
    """Which dataset, and where it lives.

    Args:
        name: ``digits`` ships with scikit-learn (the default); ``mnist`` reads IDX files,
            ``cifar10`` and ``cifar100`` the python batches, ``imagefolder`` an ImageNet-style
            train/val tree.
        path: Folder of the data; required for every dataset but ``digits``.
        val_fraction: Share of the training split held out for validation.
        img_size: Input side for ``imagefolder`` (other datasets have a native size).
        num_workers: DataLoader workers for ``imagefolder``; in-memory datasets need none.
        eval_batch_size: Batch size for evaluation.
    """

    name: Literal["digits", "mnist", "cifar10", "cifar100", "imagefolder"] = "digits"
    path: Path | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    img_size: PositiveInt = 224
    num_workers: NonNegativeInt = 4
    eval_batch_size: PositiveInt = 512

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_dir():
            raise ValueError(f"dataset path '{path}' does not exist or is not a folder")
        return path

    def unused_fields(self) -> frozenset[str]:
        """The fields this dataset does not read: its images have one size and live in
        memory, so only an image folder reads ``img_size`` and ``num_workers``."""
        return frozenset() if self.name == "imagefolder" else frozenset({"img_size", "num_workers"})

    @model_validator(mode="after")
    def _path_given(self) -> DataConfig:
        if self.name != "digits" and self.path is None:
            raise ValueError(f"data.path is required for dataset '{self.name}'")
        return self


def load_dataset(config: DataConfig) -> ImageDataset:
    """Load the dataset a :class:`DataConfig` names.

    Raises:
        DatasetError: naming the path when files are missing or malformed.
    """
    if config.name == "digits":
        return load_digits_dataset(config.val_fraction)
    assert config.path is not None  # the config validator guarantees it
    path = Path(config.path)
    if not path.is_dir():
        raise DatasetError(f"dataset path '{path}' does not exist or is not a folder")
    if config.name == "mnist":
        return load_mnist_dataset(path, config.val_fraction)
    if config.name == "cifar10":
        return load_cifar10_dataset(path, config.val_fraction)
    if config.name == "cifar100":
        return load_cifar100_dataset(path, config.val_fraction)
    return load_imagefolder_dataset(path, config.img_size, config.val_fraction, config.num_workers)
