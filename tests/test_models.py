from pathlib import Path

import pytest
import torch

from pwf_core._files import CheckpointError, save_tensors
from pwf_core.models import build_model, is_known_model, load_weights, pwf_model_names

CASES = [
    ("small_cnn", 1, 8, {}),
    ("test_resnet", 3, 32, {}),
    ("test_efficientnet", 3, 32, {}),
    ("test_byobnet", 3, 32, {}),
    ("test_vit", 1, 16, {"patch_size": 4}),
]


@pytest.mark.parametrize(("name", "chans", "size", "kwargs"), CASES)
def test_build_model_runs_offline(name, chans, size, kwargs):
    model = build_model(name, num_classes=7, in_chans=chans, img_size=size, **kwargs)
    assert model(torch.randn(2, chans, size, size)).shape == (2, 7)


INPUTS = {"small_cnn": (1, 8), "mnist_cnn": (1, 28), "cifar_resnet18": (3, 32)}


@pytest.mark.parametrize("name", pwf_model_names())
def test_every_pwf_model_builds_and_runs(name):
    chans, size = INPUTS[name]
    model = build_model(name, num_classes=7, in_chans=chans, img_size=size).eval()
    assert model(torch.randn(2, chans, size, size)).shape == (2, 7)


def test_unknown_model():
    assert not is_known_model("resnet_does_not_exist")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet_does_not_exist", 10, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_weights_round_trip(tmp_path: Path, suffix: str):
    source = build_model("small_cnn", 10, 1)
    target = build_model("small_cnn", 10, 1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_tensors(path, source.state_dict())
    load_weights(target, path)
    x = torch.randn(3, 1, 8, 8)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


def test_shape_mismatch_is_named(tmp_path: Path):
    path = save_tensors(tmp_path / "w.safetensors", build_model("small_cnn", 5, 1).state_dict())
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model("small_cnn", 10, 1), path)
    assert "head.weight: file (5, 64) vs model (10, 64)" in str(err.value)


def test_unreadable_weights_name_the_path(tmp_path: Path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors"):
        load_weights(build_model("small_cnn", 10, 1), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(build_model("small_cnn", 10, 1), tmp_path / "missing.pt")
