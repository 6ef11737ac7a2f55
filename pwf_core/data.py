"""Datasets by name, read from local files only.

``digits`` (scikit-learn's 8x8 handwritten digits) ships with a package and is the default;
``mnist`` (IDX files, raw or gzipped), ``cifar10`` (the python batches) and ``imagefolder``
(an ImageNet-style ``train/`` + ``val/`` tree) are read from ``data.path``. Nothing is
downloaded. Small datasets are held as tensors and batched without a DataLoader.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from pwf_core.config import DataConfig
from pwf_core.distributed import rank, world_size

SPLIT_SEED = 0  # Splits are fixed across experiment seeds so test sets stay comparable.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetError(RuntimeError):
    """A dataset path that is missing or whose files are malformed."""


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


@dataclass
class TensorSplit:
    """One split held in memory: normalised images, labels, and the augmentation for training."""

    images: torch.Tensor
    labels: torch.Tensor
    augment: str | None = None


@dataclass
class ImageDataset:
    """Train/val/test splits of one dataset, with what a model needs to know about it."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    train: TensorSplit | Dataset
    val: TensorSplit | Dataset | None
    test: TensorSplit | Dataset
    num_workers: int = 0

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
        return FolderLoader(source, batch_size, shuffle, seed, self.num_workers, shard)


def _split_indices(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(n * val_fraction)
    return order[n_val:], order[:n_val]


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
    shape = (1, len(mean), 1, 1)
    return (images - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _tensor_dataset(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    val_fraction: float,
    num_classes: int,
    augment: str | None = None,
) -> ImageDataset:
    train_idx, val_idx = _split_indices(len(train_labels), val_fraction)

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
    )


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
    images = _normalise(images, (mean,), (std,))
    return _tensor_dataset(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        val_fraction,
        num_classes=10,
    )


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), raw or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise DatasetError(f"cannot read IDX file '{path}': {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"'{path}' is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
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
    arrays = {}
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
        tensor = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
        arrays[split] = (
            _normalise(tensor, MNIST_MEAN, MNIST_STD),
            torch.tensor(labels, dtype=torch.long),
        )
    return _tensor_dataset("mnist", *arrays["train"], *arrays["test"], val_fraction, num_classes=10)


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


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (
        OSError,
        pickle.UnpicklingError,
        KeyError,
        TypeError,
        EOFError,
        ValueError,
        IndexError,
        AttributeError,
    ) as err:
        raise DatasetError(f"'{path}' is not a CIFAR-10 python batch: {err}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(
            f"'{path}' has data {data.shape} and {len(labels)} labels; expected (n, 3072)"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_dataset(folder: Path, val_fraction: float) -> ImageDataset:
    """CIFAR-10 from the python batches (``data_batch_1..5``, ``test_batch``) in ``folder``."""
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, folder / "test_batch"] if not p.is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder '{folder}' lacks {missing}")
    train = [_read_cifar_batch(p) for p in train_files]
    test_images, test_labels = _read_cifar_batch(folder / "test_batch")

    def as_tensors(images: np.ndarray, labels: np.ndarray):
        tensor = torch.tensor(images, dtype=torch.float32) / 255.0
        return _normalise(tensor, CIFAR10_MEAN, CIFAR10_STD), torch.tensor(labels)

    return _tensor_dataset(
        "cifar10",
        *as_tensors(np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        *as_tensors(test_images, test_labels),
        val_fraction,
        num_classes=10,
        augment="crop_flip",
    )


def read_image(path: str):
    """An RGB image, or :class:`DatasetError` naming the file that does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"image '{path}' cannot be read: {err}") from None


SAMPLE_CHECKED = 64  # image files decoded per split before anything starts


def _check_images(dataset, split: str) -> None:
    if len(dataset.samples) == 0:
        raise DatasetError(f"'{dataset.root}' ({split}) holds no image files")
    step = max(1, len(dataset.samples) // SAMPLE_CHECKED)
    for path, _ in dataset.samples[::step][:SAMPLE_CHECKED]:
        read_image(path)


def load_imagefolder_dataset(folder: Path, img_size: int, val_fraction: float, workers: int):
    """An ImageNet-style tree: ``folder/train/<class>/*`` and ``folder/val/<class>/*``.

    A spread of up to 64 files per split is decoded at once, so a folder of broken files fails
    before training starts; any other broken file fails with its path when it is read.
    """
    from torchvision import datasets, transforms

    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise DatasetError(f"image folder '{folder}' has no '{split}/' subfolder")
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(img_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(int(img_size * 256 / 224)),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            normalise,
        ]
    )
    try:
        train_full = datasets.ImageFolder(str(folder / "train"), train_tf, loader=read_image)
        val_full = datasets.ImageFolder(str(folder / "train"), eval_tf, loader=read_image)
        test = datasets.ImageFolder(str(folder / "val"), eval_tf, loader=read_image)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"cannot read image folder '{folder}': {err}") from None
    _check_images(train_full, "train")
    _check_images(test, "val")
    if train_full.classes != test.classes:
        raise DatasetError(f"'{folder}/train' and '{folder}/val' have different class folders")
    train_idx, val_idx = _split_indices(len(train_full), val_fraction)
    return ImageDataset(
        name="imagefolder",
        num_classes=len(train_full.classes),
        in_chans=3,
        img_size=img_size,
        train=Subset(train_full, train_idx.tolist()),
        val=Subset(val_full, val_idx.tolist()) if len(val_idx) else None,
        test=test,
        num_workers=workers,
    )


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
    return load_imagefolder_dataset(path, config.img_size, config.val_fraction, config.num_workers)
