"""Writers of small, real-format dataset files: MNIST IDX, CIFAR-10 batches, CIFAR-100 files,
image folders, weights files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) in the IDX format MNIST uses."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", n) for n in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist(folder: Path, n_train: int = 60, n_test: int = 20, compress: bool = False) -> Path:
    """An MNIST folder with random 28x28 images and labels 0-9."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    return folder


def write_cifar10(folder: Path, per_batch: int = 10) -> Path:
    """A cifar-10-batches-py folder with five tiny training batches and a test batch."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def write_cifar100(folder: Path, n_train: int = 40, n_test: int = 10) -> Path:
    """A cifar-100-python folder: ``train``, ``test`` and ``meta`` as the real files hold them
    (fine and coarse labels, file names, the batch label)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


def write_image_folder(root: Path, classes: int = 2, per_class: int = 3, size: int = 12) -> Path:
    """An ImageNet-style train/val tree of small PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


class RunsACommand:
    """Pickles to a call of ``os.system``: what a crafted file would do when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_crafted_cifar10(folder: Path, marker: Path) -> Path:
    """A CIFAR-10 folder whose first batch runs a command if it is unpickled naively."""
    write_cifar10(folder)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsACommand(marker)}))
    return folder


def write_weights(
    path: Path,
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    **kwargs,
) -> Path:
    """A safetensors weights file of a freshly built (seeded) ``name`` of that shape: what
    ``model.weights`` reads, standing in for a downloaded state dict.

    Args:
        **kwargs: Architecture arguments, as ``model.kwargs`` gives them.
    """
    import torch

    from pwf_core._files import save_tensors
    from pwf_core.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes, in_chans, img_size, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(path, model.state_dict())


def write_crafted_pt(path: Path, marker: Path) -> Path:
    """A ``.pt`` weights file that runs a command when loaded without ``weights_only``."""
    import torch

    torch.save({"conv.weight": RunsACommand(marker)}, path)
    return path
