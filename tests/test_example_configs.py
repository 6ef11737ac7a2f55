"""The shipped example configs validate and build their models on real-format data."""

from pathlib import Path

import pytest
import torch

from pwf_core.config import ConfigError, load_config
from pwf_core.data import load_dataset
from pwf_core.pretrain import build_experiment_model
from tests._dummies.files import write_cifar10, write_mnist
from tests.conftest import ROOT

EXAMPLES = {
    "mnist.yaml": write_mnist,
    "cifar10_resnet18.yaml": write_cifar10,
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_runs_its_model(name: str, tmp_path: Path):
    folder = EXAMPLES[name](tmp_path / "data")
    config = load_config(ROOT / "configs" / name, {"data.path": str(folder)})
    dataset = load_dataset(config.data)
    model = build_experiment_model(config, dataset).eval()
    images, labels = next(iter(dataset.loader("test", 4)))
    assert model(images).shape == (len(labels), dataset.num_classes)
    assert torch.isfinite(model(images)).all()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_names_a_missing_path(name: str):
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(ROOT / "configs" / name)
