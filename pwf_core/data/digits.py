"""scikit-learn's handwritten digits: the default dataset, shipped with the package."""

from __future__ import annotations

import torch

from pwf_core.data.splits import SPLIT_SEED, ImageDataset, normalise, tensor_dataset


def load_digits_dataset(val_fraction: float) -> ImageDataset:
    """scikit-learn's digits: 1797 8x8 images, a fixed 20 % test split, normalised by train."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(0.2 * len(labels))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = normalise(images, (mean,), (std,))
    return tensor_dataset(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        val_fraction,
        num_classes=10,
    )
