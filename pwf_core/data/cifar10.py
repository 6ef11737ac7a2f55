"""CIFAR-10 from its python batches, read by an unpickler that admits only arrays, lists and
bytes: a crafted batch cannot name a function to run."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from pwf_core.data.contract import InputContract
from pwf_core.data.splits import ImageDataset, check_labels, tensor_dataset
from pwf_core.errors import DatasetError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# batches.meta's label_names, in label order
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CONTRACT = InputContract(
    shape=(3, 32, 32),
    raw_range=(0.0, 255.0),
    divide_by=255.0,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    class_names=CIFAR10_CLASSES,
)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, bytes, str, ints and NumPy
    arrays) and nothing else: a crafted batch cannot name a function to run."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(
    path: Path,
    labels_key: bytes = b"labels",
    what: str = "CIFAR-10 python batch",
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 3, 32, 32)`` and labels of one python batch of CIFAR-10 or CIFAR-100.

    Args:
        path: The pickled batch.
        labels_key: The labels' key in the batch (CIFAR-100 has ``fine_labels``).
        what: What the file should be, for the error.
        num_classes: Labels must be class indices below it.

    Raises:
        DatasetError: naming the file when it is not such a batch (a crafted one included).
    """
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[labels_key], dtype=np.int64)
    except Exception as err:  # whatever a damaged or crafted pickle makes the unpickler do
        raise DatasetError(f"'{path}' is not a {what}: {type(err).__name__}: {err}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(
            f"'{path}' has data {data.shape} and {len(labels)} labels; expected (n, 3072)"
        )
    check_labels(labels, num_classes, f"labels of '{path}'")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_dataset(folder: Path, val_fraction: float) -> ImageDataset:
    """CIFAR-10 from the python batches (``data_batch_1..5``, ``test_batch``) in ``folder``."""
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, folder / "test_batch"] if not p.is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder '{folder}' lacks {missing}")
    train = [read_cifar_batch(p) for p in train_files]
    test_images, test_labels = read_cifar_batch(folder / "test_batch")

    def as_tensors(images: np.ndarray, labels: np.ndarray):
        return CONTRACT.normalise(torch.tensor(images)), torch.tensor(labels)

    return tensor_dataset(
        "cifar10",
        *as_tensors(np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        *as_tensors(test_images, test_labels),
        val_fraction,
        num_classes=10,
        augment="crop_flip",
        contract=CONTRACT,
    )
