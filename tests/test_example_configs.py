"""The shipped example configs validate and build their models on real-format data."""

from pathlib import Path

import pytest
import torch

from pwf_core.config import ConfigError, config_to_dict, load_config
from pwf_core.data import load_dataset
from pwf_core.pretrain import build_experiment_model
from tests._dummies.files import write_cifar10, write_mnist
from tests.conftest import ROOT

# Every shipped config, with the dummy files its dataset reads (digits ship with scikit-learn).
SHIPPED = {
    "default.yaml": None,
    "2dgbnn.yaml": None,
    "mnist.yaml": write_mnist,
    "cifar10_resnet18.yaml": write_cifar10,
    "2dgbnn_cifar10_resnet18.yaml": write_cifar10,
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


def test_every_shipped_config_is_run_below():
    assert sorted(SHIPPED) == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_runs_to_its_end(name: str, prefect_server, mlflow_store, tmp_path: Path):
    """The experiment flow, as ``pwf run configs/<name>`` starts it, on a tiny base."""
    from pwf_flows.experiment import pwf_experiment

    overrides = {**TINY, "name": f"shipped-{name.removesuffix('.yaml')}"}
    if SHIPPED[name] is not None:
        overrides["data.path"] = str(SHIPPED[name](tmp_path / "data"))
    method = load_config(ROOT / "configs" / name, overrides).compression.method
    config = load_config(ROOT / "configs" / name, {**overrides, **TINY_METHOD[method]})
    result = pwf_experiment(
        config=config_to_dict(config), artifacts_dir=str(tmp_path / "a"), progress=False
    )
    metrics = result["metrics"]
    assert 0.0 <= metrics["cls/acc"] <= 1.0 and metrics["size/file_bytes"] > 0
    assert metrics["ws/shared_values"] >= 1
