from pathlib import Path

import pytest
import torch

from pwf_core.config import DataConfig
from pwf_core.data import DatasetError, load_dataset, read_idx
from tests._dummies.files import (
    RunsACommand,
    write_cifar10,
    write_cifar100,
    write_idx,
    write_image_folder,
    write_mnist,
)


def test_digits_split_is_fixed_and_normalised():
    first, second = load_dataset(DataConfig()), load_dataset(DataConfig())
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.num_classes == 10 and first.in_chans == 1 and first.img_size == 8
    n_train, n_val, n_test = (len(s.labels) for s in (first.train, first.val, first.test))
    assert n_train + n_val + n_test == 1797 and n_test == 359
    assert abs(first.train.images.mean().item()) < 0.05  # standardised on the training pool


def test_loader_shuffles_reproducibly_per_epoch():
    dataset = load_dataset(DataConfig())
    loader = dataset.loader("train", 32, shuffle=True, seed=5)
    first = next(iter(loader))[1]
    assert torch.equal(first, next(iter(loader))[1])
    loader.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[1])
    assert sum(len(y) for _, y in loader) == loader.num_samples


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_idx_files(tmp_path: Path, compress: bool):
    folder = write_mnist(tmp_path / "mnist", compress=compress)
    dataset = load_dataset(DataConfig(name="mnist", path=folder, val_fraction=0.25))
    assert dataset.img_size == 28 and dataset.in_chans == 1
    assert len(dataset.train.labels) == 45 and len(dataset.test.labels) == 20


def test_malformed_idx_is_named(tmp_path: Path):
    path = write_idx(tmp_path / "x-idx3-ubyte", torch.zeros(2, 3, 3, dtype=torch.uint8).numpy())
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DatasetError, match="truncated or malformed"):
        read_idx(path)
    (tmp_path / "y").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "y")


def test_mnist_folder_without_files(tmp_path: Path):
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset(DataConfig(name="mnist", path=tmp_path))


def test_cifar10_batches(tmp_path: Path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    dataset = load_dataset(DataConfig(name="cifar10", path=tmp_path, val_fraction=0.2))
    assert dataset.in_chans == 3 and dataset.img_size == 32
    assert len(dataset.train.labels) == 40 and len(dataset.test.labels) == 10
    images, _ = next(iter(dataset.loader("train", 8, shuffle=True)))
    assert images.shape == (8, 3, 32, 32)  # augmented crops keep the size
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", path=tmp_path))


def test_cifar100_files(tmp_path: Path):
    folder = write_cifar100(tmp_path / "cifar-100-python")
    dataset = load_dataset(DataConfig(name="cifar100", path=tmp_path, val_fraction=0.25))
    assert dataset.num_classes == 100 and dataset.in_chans == 3 and dataset.img_size == 32
    assert len(dataset.train.labels) == 30 and len(dataset.val.labels) == 10
    assert len(dataset.test.labels) == 10 and int(dataset.test.labels.max()) < 100
    images, _ = next(iter(dataset.loader("train", 8, shuffle=True)))
    assert images.shape == (8, 3, 32, 32)
    (folder / "test").unlink()
    with pytest.raises(DatasetError, match=r"lacks \['test'\]"):
        load_dataset(DataConfig(name="cifar100", path=folder))


def test_cifar100_refuses_a_crafted_file(tmp_path: Path):
    """The same restricted unpickler as CIFAR-10: a pickle that names a function is refused,
    and nothing runs."""
    import pickle

    folder = write_cifar100(tmp_path / "c")
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({b"data": RunsACommand(marker)}))
    with pytest.raises(DatasetError, match=r"not a CIFAR-100 python file.*refused to load posix"):
        load_dataset(DataConfig(name="cifar100", path=folder))
    assert not marker.exists()


def test_image_folder(tmp_path: Path):
    root = write_image_folder(tmp_path / "imgs")
    dataset = load_dataset(DataConfig(name="imagefolder", path=root, img_size=8, num_workers=0))
    assert dataset.num_classes == 2
    images, _ = next(iter(dataset.loader("test", 4)))
    assert images.shape == (4, 3, 8, 8)
    with pytest.raises(DatasetError, match="no 'train/' subfolder"):
        load_dataset(DataConfig(name="imagefolder", path=root / "train"))


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_batches_are_torchvisions_normalised_images(tmp_path: Path, workers: int):
    """uint8 from the workers, normalised in one pass: the same tensors as ToTensor+Normalize."""
    from torchvision import datasets, transforms

    from pwf_core.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, read_image

    root = write_image_folder(tmp_path / "imgs", per_class=5)
    config = DataConfig(name="imagefolder", path=root, img_size=8, num_workers=workers)
    loader = load_dataset(config).loader("test", 4).to("cpu")
    reference = datasets.ImageFolder(
        str(root / "val"),
        transforms.Compose(
            [
                transforms.Resize(int(8 * 256 / 224)),
                transforms.CenterCrop(8),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
        loader=read_image,
    )
    images = torch.cat([batch for batch, _ in loader])
    labels = torch.cat([label for _, label in loader])
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    assert images.dtype == torch.float32 and images.shape == expected.shape
    assert torch.allclose(images, expected, atol=1e-5)
    assert labels.tolist() == [reference[i][1] for i in range(len(reference))]
    assert loader.loader.pin_memory is False  # pinned only for a CUDA device
    assert (loader.loader.prefetch_factor == 4) == (workers > 0)
    assert loader.loader.persistent_workers == (workers > 0)
