"""scikit-learn's handwritten digits: the default dataset, shipped with the package."""

from __future__ import annotations

import torch

from pwf_core.data.contract import InputContract
from pwf_core.data.splits import SPLIT_SEED, ImageDataset, tensor_dataset

DIGITS_MAX = 16.0  # a pixel counts the set cells of a 4x4 block: 0 to 16


def load_digits_dataset(val_fraction: float) -> ImageDataset:
    """scikit-learn's digits: 1797 8x8 images, a fixed 20 % test split, normalised by train
    (pixels / 16, then the training images' mean and standard deviation)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(0.2 * len(labels))
    test_idx, train_idx = order[:n_test], order[n_test:]
    scaled = raw[train_idx] / DIGITS_MAX
    contract = InputContract(
        shape=tuple(raw.shape[1:]),
        raw_range=(0.0, DIGITS_MAX),
        divide_by=DIGITS_MAX,
        mean=(scaled.mean().item(),),
        std=(scaled.std().item(),),
        class_names=tuple(str(name) for name in digits.target_names),
    )
    images = contract.normalise(raw)
    return tensor_dataset(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        val_fraction,
        num_classes=10,
        contract=contract,
    )
