"""MNIST from its IDX files (raw or gzipped), as the original distribution lays them out."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from pwf_core.data.contract import InputContract
from pwf_core.data.splits import ImageDataset, check_labels, tensor_dataset
from pwf_core.errors import DatasetError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), raw or gzipped.

    Raises:
        DatasetError: naming the file, for anything that is not a whole IDX file (a gzip
            stream cut short, a header whose shape does not match the bytes that follow).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except Exception as err:  # OSError, EOFError and zlib.error from a damaged gzip stream
        raise DatasetError(f"cannot read IDX file '{path}': {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"'{path}' is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"'{path}' is truncated: its header names {ndim} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"'{path}' is truncated or malformed: header says {shape}, "
            f"{expected} bytes expected, {len(data) - header} found"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_file(folder: Path, stems: tuple[str, ...]) -> Path:
    for candidate_dir in (folder, folder / "raw", folder / "MNIST" / "raw"):
        for stem in stems:
            for suffix in ("", ".gz"):
                path = candidate_dir / f"{stem}{suffix}"
                if path.is_file():
                    return path
    raise DatasetError(f"no '{stems[0]}' (or .gz) under '{folder}'")


def load_mnist_dataset(folder: Path, val_fraction: float) -> ImageDataset:
    """MNIST from the four IDX files in ``folder`` (also looks in ``raw/`` and ``MNIST/raw/``)."""
    arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    contract = None
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(
            _find_file(folder, (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"))
        )
        labels = read_idx(
            _find_file(folder, (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"))
        )
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"MNIST {split} files under '{folder}' disagree: "
                f"images {images.shape}, labels {labels.shape}"
            )
        check_labels(labels, 10, f"MNIST {split} labels under '{folder}'")
        raw = torch.tensor(images, dtype=torch.float32).unsqueeze(1)
        contract = InputContract(
            shape=tuple(raw.shape[1:]),
            raw_range=(0.0, 255.0),
            divide_by=255.0,
            mean=MNIST_MEAN,
            std=MNIST_STD,
            class_names=tuple(str(digit) for digit in range(10)),
        )
        arrays[split] = (contract.normalise(raw), torch.tensor(labels, dtype=torch.long))
    return tensor_dataset(
        "mnist", *arrays["train"], *arrays["test"], val_fraction, num_classes=10, contract=contract
    )
