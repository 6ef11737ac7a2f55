"""An ImageNet-style tree of image files: ``train/<class>/*`` and ``val/<class>/*``."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Subset

from pwf_core.data.contract import InputContract
from pwf_core.data.splits import ImageDataset, split_indices
from pwf_core.errors import DatasetError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

SAMPLE_CHECKED = 64  # image files decoded per split before anything starts


def read_image(path: str):
    """An RGB image, or :class:`DatasetError` naming the file that does not decode."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except Exception as err:  # PIL's decoders fail in many ways (even SyntaxError) on bad bytes
        raise DatasetError(f"image '{path}' cannot be read: {err}") from None


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
    # uint8 out of the workers; the loader normalises on the device (FolderLoader).
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(img_size),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(_resize_side(img_size)),
            transforms.CenterCrop(img_size),
            transforms.PILToTensor(),
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
    train_idx, val_idx = split_indices(len(train_full), val_fraction)
    contract = InputContract(
        shape=(3, img_size, img_size),
        raw_range=(0.0, 255.0),
        divide_by=255.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=tuple(train_full.classes),
        resize=f"an RGB image, its shorter side resized to {_resize_side(img_size)} px "
        f"(bilinear), centre-cropped to {img_size} x {img_size}",
    )
    return ImageDataset(
        name="imagefolder",
        num_classes=len(train_full.classes),
        in_chans=3,
        img_size=img_size,
        train=Subset(train_full, train_idx.tolist()),
        val=Subset(val_full, val_idx.tolist()) if len(val_idx) else None,
        test=test,
        num_workers=workers,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        contract=contract,
    )


def _resize_side(img_size: int) -> int:
    """The shorter side an evaluated image is resized to before its centre crop (ImageNet's
    256 for 224)."""
    return int(img_size * 256 / 224)
