"""The shipped example configs validate and build their models on real-format data."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from pwf_core.config import ConfigError, config_to_dict, load_config
from pwf_core.data import load_dataset
from pwf_core.pretrain import build_experiment_model
from tests._dummies.files import (
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_mnist,
    write_weights,
)
from tests.conftest import ROOT

# An ImageNet-style tree of the real layout, tiny: 2 classes x 4 images a split, read at 32x32.
TINY_IMAGENET = {"data.img_size": 32, "data.num_workers": 0}
# The same timm architectures, narrow and shallow, for the runs to their end (tens of thousands
# of weights instead of millions: seconds instead of a minute each; the code paths are those of
# the full networks, which test_example_config_runs_its_model builds and runs at full size).
NARROW = {
    "resnet": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
    "cifar_resnet": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
    "deit": {"depth": 2, "embed_dim": 48, "num_heads": 3},
}


def narrow(model: str) -> dict:
    """``model.kwargs`` that shrink the timm architecture ``model`` (none for pwf's own)."""
    return next((kwargs for family, kwargs in NARROW.items() if model.startswith(family)), {})


def imagenet_files(folder: Path, config: Path, **kwargs) -> dict:
    """A tiny image folder and a weights file for the config's model at that size.

    Args:
        **kwargs: Architecture arguments of the model (``model.kwargs``).
    """
    model = config_model(config)
    root = write_image_folder(folder / "imagenet", classes=2, per_class=4, size=40)
    weights = write_weights(folder / f"{model}.safetensors", model, 2, 3, 32, **kwargs)
    overrides = {"data.path": str(root), "model.weights": str(weights), **TINY_IMAGENET}
    return overrides | ({"model.kwargs": kwargs} if kwargs else {})


def data_files(writer: Callable[[Path], Path]) -> Callable[..., dict]:
    """Dummy files of ``writer``'s dataset (and ``model.kwargs`` when there are any)."""

    def files(folder: Path, config: Path, **kwargs) -> dict:
        overrides = {"data.path": str(writer(folder / "data"))}
        return overrides | ({"model.kwargs": kwargs} if kwargs else {})

    return files


def config_model(config: Path) -> str:
    """The model a config file names."""
    return yaml.safe_load(config.read_text())["model"]["name"]


# Every shipped config, and the dummy files of the real formats its dataset and weights are
# read from (None: digits, which ship with scikit-learn).
SHIPPED: dict[str, Callable[..., dict] | None] = {
    "default.yaml": None,
    "2dgbnn.yaml": None,
    "mnist.yaml": data_files(write_mnist),
    "cifar10_resnet18.yaml": data_files(write_cifar10),
    "2dgbnn_cifar10_resnet18.yaml": data_files(write_cifar10),
    "2dgbnn_cifar100_resnet18.yaml": data_files(write_cifar100),
    "2dgbnn_imagenet_resnet18.yaml": imagenet_files,
    "pwfn_imagenet_resnet18.yaml": imagenet_files,
    "pwfn_imagenet_resnet34.yaml": imagenet_files,
    "pwfn_imagenet_resnet50.yaml": imagenet_files,
    "pwfn_imagenet_deit_tiny.yaml": imagenet_files,
    "pwfn_imagenet_deit_small.yaml": imagenet_files,
}
TINY = {  # the same experiment on a tiny base: few epochs, two rounds, small batches
    "pretrain.epochs": 1,
    "pretrain.batch_size": 16,
    "train.epochs": 0.5,
    "train.batch_size": 16,
    "eval.mc_samples": 2,
}
TINY_METHOD = {
    "pwfn": {"compression.schedule": [0.5, 1.0]},
    "2dgbnn": {
        "compression.bnn_epochs": 1,
        "compression.vi_epochs": 1,
        "compression.eval_samples": 2,
        "compression.gaussians": 8,
        "compression.min_cluster_size": 2,
    },
}

EXAMPLES = sorted(name for name, files in SHIPPED.items() if files is not None)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_runs_its_model(name: str, tmp_path: Path):
    path = ROOT / "configs" / name
    config = load_config(path, SHIPPED[name](tmp_path, path))
    dataset = load_dataset(config.data)
    model = build_experiment_model(config, dataset).eval()
    images, labels = next(iter(dataset.loader("test", 4)))
    assert model(images).shape == (len(labels), dataset.num_classes)
    assert torch.isfinite(model(images)).all()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_names_a_missing_path(name: str):
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(ROOT / "configs" / name)


def test_every_shipped_config_is_run_below():
    assert sorted(SHIPPED) == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_runs_to_its_end(name: str, prefect_server, mlflow_store, tmp_path: Path):
    """The experiment flow, as ``pwf run configs/<name>`` starts it, on a tiny base."""
    from pwf_flows.experiment import pwf_experiment

    path = ROOT / "configs" / name
    overrides = {**TINY, "name": f"shipped-{name.removesuffix('.yaml')}"}
    if SHIPPED[name] is not None:
        overrides.update(SHIPPED[name](tmp_path, path, **narrow(config_model(path))))
    shipped = load_config(path, overrides)
    if not yaml.safe_load(path.read_text())["pretrain"]["epochs"]:
        overrides["pretrain.epochs"] = 0  # the weights file is the pretrained model
    config = load_config(path, {**overrides, **TINY_METHOD[shipped.compression.method]})
    result = pwf_experiment(
        config=config_to_dict(config), artifacts_dir=str(tmp_path / "a"), progress=False
    )
    metrics = result["metrics"]
    assert 0.0 <= metrics["cls/acc"] <= 1.0 and metrics["size/file_bytes"] > 0
    assert metrics["ws/shared_values"] >= 1
