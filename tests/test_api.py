"""The public API as a researcher uses it: their own Conv1d model, plain TensorDataset loaders."""

from __future__ import annotations

import copy
import random
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwf_core
from pwf_core import PWFNConfig, compress, load_compressed, save_compressed, strip
from pwf_core._files import CheckpointError
from pwf_core.bayes import bayesian_params
from tests._dummies.models import SignalNet, VolumeNet, signal_data, train_plainly
from tests.conftest import ROOT

SHORT = {"method": "pwfn", "b": 4, "max_order": 2, "schedule": [0.5, 0.8, 1.0]}


@pytest.fixture(scope="module")
def signals():
    train_x, train_y = signal_data(512, seed=0)
    test_x, test_y = signal_data(256, seed=1)
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)


@pytest.fixture(scope="module")
def trained_state(signals):
    torch.manual_seed(0)
    model = train_plainly(SignalNet(), *signals[0].tensors, epochs=8)
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def trained(trained_state):
    model = SignalNet()
    model.load_state_dict(trained_state)
    return model


def loaders(signals, shuffle: bool = True):
    train, test = signals
    return DataLoader(train, batch_size=32, shuffle=shuffle), DataLoader(test, batch_size=64)


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_compress_a_users_conv1d_model(trained, signals):
    before = accuracy(trained, signals[1])
    assert before > 0.85  # the user's model learnt its task
    train_loader, test_loader = loaders(signals)
    history = compress(
        trained, train_loader, SHORT, eval_loader=test_loader, train={"epochs": 1}, progress=False
    )
    assert list(history["round"]) == [1, 2, 3]
    assert list(history["fraction"]) == [0.5, 0.8, 1.0]
    assert {"cls/acc", "ws/unique_values", "ws/unique_fixed_values"} <= set(history.columns)
    assert history["ws/fixed_fraction"].iloc[-1] == 1.0
    final = history.iloc[-1]
    # In place: the model is fixed, eval-ready, with sampling off (two calls agree).
    values = torch.cat([p.mu.detach().flatten() for p in bayesian_params(trained)])
    assert torch.unique(values).numel() == final["ws/unique_values"] <= 40
    x = signals[1].tensors[0]
    with torch.no_grad():
        assert torch.equal(trained(x), trained(x))
    assert final["cls/acc"] == accuracy(trained, signals[1])
    assert final["cls/acc"] >= before - 0.05
    assert history.attrs["final"]["cls/acc"] == final["cls/acc"]


def test_global_random_state_is_left_alone(trained, signals):
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    train_loader, test_loader = loaders(signals)  # a shuffling DataLoader draws from torch's RNG
    compress(trained, train_loader, SHORT, eval_loader=test_loader, progress=False)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_same_seed_same_result(trained_state, signals):
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = SignalNet()
        model.load_state_dict(trained_state)
        train_loader, _ = loaders(signals)
        compress(model, train_loader, SHORT, seed=seed, train={"epochs": 1}, progress=False)
        return model.state_dict()

    first, second, other = run(3), run(3), run(4)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_save_and_load_into_a_fresh_instance(trained, signals, tmp_path):
    train_loader, _ = loaders(signals)
    compress(trained, train_loader, SHORT, train={"epochs": 0.5}, progress=False)
    report = save_compressed(trained, tmp_path / "signal.safetensors")
    assert report.file_bytes < report.float32_bytes
    loaded = load_compressed(report.path, model=SignalNet())
    assert type(loaded) is SignalNet
    x = signals[1].tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    with pytest.raises(CheckpointError, match=r"SignalNet: pass a fresh instance"):
        load_compressed(report.path)


def test_strip_gives_back_the_plain_module(trained, signals):
    plain_keys = set(SignalNet().state_dict())
    train_loader, _ = loaders(signals)
    compress(trained, train_loader, SHORT, train={"epochs": 0.5}, progress=False)
    x = signals[1].tensors[0]
    with torch.no_grad():
        expected = trained(x)
    stripped = strip(trained)
    assert stripped is trained
    assert type(stripped.conv1) is nn.Conv1d and type(stripped.head) is nn.Linear
    assert set(stripped.state_dict()) == plain_keys
    fresh = SignalNet()
    fresh.load_state_dict(stripped.state_dict())  # strict: same keys, same shapes
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
        assert torch.equal(stripped.train()(x), stripped(x))  # no sampling left, even training
    assert not stripped._forward_pre_hooks and not stripped.conv1._forward_pre_hooks


def test_method_as_a_config_object_and_conv3d(signals):
    torch.manual_seed(0)
    model = VolumeNet()
    x = torch.randn(64, 1, 4, 4, 4)
    y = (x.mean(dim=(1, 2, 3, 4)) > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    config = PWFNConfig(b=3, schedule=(0.5, 1.0))
    history = compress(model, data, config, eval_loader=data, progress=False)
    assert history["ws/fixed_fraction"].iloc[-1] == 1.0
    assert type(model.conv).__name__ == "BayesianConv3d"
    kmeans = compress(
        SignalNet(), loaders(signals)[0], {"method": "kmeans", "clusters": 6}, progress=False
    )
    assert kmeans["ws/unique_values"].iloc[-1] <= 6


def test_bad_method_and_loader_inputs(trained, signals):
    train_loader, _ = loaders(signals)
    with pytest.raises(ValueError, match=r"unknown method 'magic'; known: .*pwfn"):
        compress(trained, train_loader, {"method": "magic"}, progress=False)
    with pytest.raises(ValueError, match="needs a 'method' key"):
        compress(trained, train_loader, {"b": 4}, progress=False)
    batches = iter(list(train_loader))  # an iterator has no len(): a fraction of an epoch fails
    with pytest.raises(ValueError, match=r"has no len\(\)"):
        compress(trained, batches, SHORT, progress=False)
    with pytest.raises(ValueError, match="already converted"):
        compress(trained, train_loader, SHORT, progress=False)


def test_public_api_is_what_the_readme_shows():
    assert {"compress", "save_compressed", "load_compressed", "strip", "PWFNConfig"} <= set(
        pwf_core.__all__
    )
    for name in pwf_core.__all__:
        assert hasattr(pwf_core, name), name


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's "Python API" block, executed as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my_net.safetensors").is_file()
