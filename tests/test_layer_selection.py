"""Layers the user keeps in float: ``compression.include``/``exclude`` patterns and
``filter_fn(module, name)``, on timm models, through a checkpoint and into the file."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pwf_core import Compression, compress, load_compressed, save_compressed
from pwf_core.bayes import bayesian_params, check_patterns, module_filter, to_bayesian
from pwf_core.config import load_config
from pwf_core.data import load_dataset
from pwf_core.errors import ConfigError
from pwf_core.export import read_header
from pwf_core.preflight import check_selection
from pwf_core.pretrain import model_spec
from tests._dummies.models import SignalNet, signal_data
from tests.conftest import DEFAULT_CONFIG

# One fixing step and no training: what matters here is which layers are converted.
ONE_STEP = {"method": "uniform", "bits": 4, "schedule": [1.0]}
NO_TRAINING = {"epochs": 0, "first_round_epochs": 0}

# (timm name, kwargs, patterns kept in float, the tensors they select)
TIMM_CASES = [
    (
        "resnet18",
        {},
        ("conv1", "fc"),
        {"conv1.weight", "fc.weight", "fc.bias"},
    ),
    (
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8},
        ("head", "patch_embed"),
        {"head.weight", "head.bias", "patch_embed.proj.weight", "patch_embed.proj.bias"},
    ),
    (
        "convnext_atto",
        {},
        ("stem*", "head"),
        {"stem.0.weight", "stem.0.bias", "head.fc.weight", "head.fc.bias"},
    ),
]


def _images(n: int = 8, size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=generator)
    return DataLoader(TensorDataset(x, torch.arange(n) % 10), batch_size=4)


@pytest.mark.parametrize(
    ("name", "kwargs", "patterns", "kept"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES]
)
def test_excluded_timm_layers_stay_float_and_are_counted_apart(
    name, kwargs, patterns, kept, tmp_path
):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    original = copy.deepcopy(model.state_dict())
    loader = _images()
    frame = compress(
        model, loader, {**ONE_STEP, "exclude": list(patterns)}, train=NO_TRAINING, progress=False
    )
    converted = {p.name for p in bayesian_params(model)}
    assert not converted & kept and converted
    for tensor in kept:  # untouched, bit for bit
        assert torch.equal(model.get_parameter(tensor), original[tensor])
    final = frame.attrs["final"]
    kept_values = sum(original[t].numel() for t in kept)
    assert final["ws/params_excluded"] == kept_values
    assert final["ws/params_converted"] == sum(p.mu.numel() for p in bayesian_params(model))
    assert final["ws/unique_values"] <= 2**4 - 1  # the float layers are not among them

    report = save_compressed(model, tmp_path / "m.safetensors")
    header = read_header(report.path)
    assert {layer for layer, _ in header["layout"]} == converted
    loaded = load_compressed(report.path, model=timm.create_model(name, num_classes=10, **kwargs))
    for tensor in kept:
        assert torch.equal(loaded.get_parameter(tensor), original[tensor])
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_include_selects_only_the_layers_it_names():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report = to_bayesian(model, filter_fn=module_filter(include=("layer4*",), exclude=("*.0.*",)))
    assert report.converted and all(n.startswith("layer4.1.") for n in report.converted)


def test_filter_fn_keeps_a_users_classifier_in_float():
    x, y = signal_data(128, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = SignalNet()
    head = model.head.weight.detach().clone()
    frame = compress(
        model,
        loader,
        ONE_STEP,
        train=NO_TRAINING,
        progress=False,
        filter_fn=lambda module, name: not isinstance(module, nn.Linear),
    )
    converted = [p.name for p in bayesian_params(model)]
    assert converted == ["conv1.weight", "conv1.bias", "conv2.weight"]
    assert torch.equal(model.head.weight, head)
    assert frame.attrs["final"]["ws/params_excluded"] == 16 * 4 + 4


def test_a_resumed_run_converts_the_same_layers(tmp_path):
    x, y = signal_data(128, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    method = {"method": "pwfn", "b": 4, "schedule": [0.5, 1.0], "exclude": ["head"]}
    run = Compression(SignalNet(), method, loader, train={"epochs": 0.25}, progress=False)
    run.convert()
    run.run_step(0)
    run.save(tmp_path / "step.safetensors")
    resumed = Compression(SignalNet(), method, loader, train={"epochs": 0.25}, progress=False)
    resumed.restore(tmp_path / "step.safetensors")
    assert [p.name for p in bayesian_params(resumed.model)] == [
        p.name for p in bayesian_params(run.model)
    ]
    assert "head.weight" not in {p.name for p in bayesian_params(resumed.model)}


def test_patterns_that_name_no_layer_are_refused_with_the_layers_listed():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"'fcc' matches no conv/linear layer.*conv1, layer1"):
        check_patterns(model, (), ("fcc",))
    with pytest.raises(ValueError, match="leave no layer"):
        check_patterns(model, ("fc",), ("fc",))
    config = load_config(DEFAULT_CONFIG, {"compression.exclude": ["classifier"]})
    dataset = load_dataset(config.data)
    with pytest.raises(ConfigError, match=r"compression\.exclude: 'classifier'"):
        check_selection(config, model_spec(config, dataset))
