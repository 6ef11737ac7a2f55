"""Images per second of pwf's image-folder loader against torchvision's plain pipeline.

A generated folder of JPEGs (ImageNet-shaped tree, random-noise photos of 160x120 pixels) is
read both ways with the same transforms (RandomResizedCrop, horizontal flip) and the same
worker count, batch size and seed, and each batch is consumed as training would, as a
normalised float tensor on the device: pwf's ``FolderLoader`` (uint8 from the workers,
normalised on the device) against ``torchvision.datasets.ImageFolder`` with ``ToTensor`` and
``Normalize`` in the workers and a ``DataLoader``. Two epochs each, alternating, best of
``--repeats``; the ratio is pwf / torchvision. Writes ``benchmarks/results/loader_speed.json``.

Usage: ``python benchmarks/loader_speed.py [--images N] [--workers 0,1,2] [--repeats R]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_file import write_results
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pwf_core.data import DataConfig, load_dataset
from pwf_core.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, read_image

RESULTS = Path(__file__).parent / "results" / "loader_speed.json"


def write_jpegs(root: Path, images: int, classes: int = 4) -> Path:
    """``root/{train,val}/<class>/*.jpg`` of random photos."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for index in range(count):
            folder = root / split / f"class{index % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def torchvision_loader(root: Path, img_size: int, batch: int, workers: int) -> DataLoader:
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(img_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform, loader=read_image)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def images_per_second(loader, device: torch.device, epochs: int = 2) -> float:
    """Consume ``epochs`` epochs as a training loop does; images per second."""
    seen = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            assert images.dtype == torch.float32
            seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="worker counts, one row each")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp), args.images)
        for workers in map(int, args.workers.split(",")):
            config = DataConfig(
                name="imagefolder",
                path=root,
                img_size=args.img_size,
                num_workers=workers,
                val_fraction=0.0,
            )
            pwf = load_dataset(config).loader("train", args.batch, shuffle=True).to(device)
            plain = torchvision_loader(root, args.img_size, args.batch, workers)
            images_per_second(pwf, device, 1)  # start the persistent workers of both
            images_per_second(plain, device, 1)
            pwf_rates, plain_rates = [], []
            for _ in range(args.repeats):
                pwf_rates.append(images_per_second(pwf, device))
                plain_rates.append(images_per_second(plain, device))
            row = {
                "device": device.type,
                "images": args.images,
                "img_size": args.img_size,
                "batch": args.batch,
                "workers": workers,
                "pwf_images_per_s": round(max(pwf_rates), 1),
                "torchvision_images_per_s": round(max(plain_rates), 1),
                "ratio": round(max(pwf_rates) / max(plain_rates), 3),
                "target_ratio": 1.0,
            }
            rows.append(row)
            print(json.dumps(row))
            del pwf, plain  # their worker processes end here
    write_results(RESULTS, "loader_speed", rows, device=device.type, cpus=os.cpu_count())


if __name__ == "__main__":
    main()
