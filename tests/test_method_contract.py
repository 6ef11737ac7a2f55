"""What every registered method promises, tested for each one the registry holds."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pwf_core import Compression
from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.methods.rounds import FixingMethod, FlatWeights, fixed_target
from pwf_core.registry import config_class, create_method, method_names
from tests._dummies.models import SignalNet, signal_data, train_plainly

# Knobs that make a method quick on a tiny model; a method not listed runs on its defaults.
QUICK = {
    "kmeans": {"clusters": 8},
    "2dgbnn": {"bnn_epochs": 1, "vi_epochs": 2, "gaussians": 8, "min_cluster_size": 2},
}


def quick_config(name: str) -> dict:
    values = {"method": name, **QUICK.get(name, {})}
    if "schedule" in config_class(name).model_fields:
        values["schedule"] = [0.3, 0.6, 1.0]
    return values


FIXING = [n for n in method_names() if isinstance(create_method(quick_config(n)), FixingMethod)]


@pytest.fixture(scope="module")
def trained_state():
    torch.manual_seed(0)
    x, y = signal_data(256, seed=0)
    return copy.deepcopy(train_plainly(SignalNet(), x, y, epochs=4).state_dict())


def converted(trained_state, method) -> SignalNet:
    model = SignalNet()
    model.load_state_dict(trained_state)
    method.convert(model)
    return model


def loader() -> DataLoader:
    x, y = signal_data(128, seed=2)
    return DataLoader(TensorDataset(x, y), batch_size=32)


@pytest.mark.parametrize("name", FIXING)
def test_each_round_fixes_exactly_its_quota_and_keeps_earlier_fixings(name, trained_state):
    method = create_method(quick_config(name))
    model = converted(trained_state, method)
    weights = FlatWeights.gather(model)
    for index, step in enumerate(method.plan()):
        before_mu, before_fixed = weights.mu.clone(), weights.fixed.clone()
        method.fix(weights, fixed_target(step.fraction, len(weights)), index)
        assert weights.num_fixed == fixed_target(step.fraction, len(weights))
        assert torch.equal(weights.mu[before_fixed], before_mu[before_fixed])
        assert torch.equal(weights.fixed[before_fixed], before_fixed[before_fixed])
    assert weights.fixed.all()


@pytest.mark.parametrize("name", FIXING)
def test_method_state_round_trips_between_rounds(name, trained_state):
    method = create_method(quick_config(name))
    model = converted(trained_state, method)
    weights = FlatWeights.gather(model)
    method.fix(weights, fixed_target(0.3, len(weights)), 0)
    restored = create_method(quick_config(name))
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    twin = FlatWeights(weights.mu.clone(), weights.sigma.clone(), weights.fixed.clone())
    method.fix(weights, fixed_target(0.6, len(weights)), 1)
    restored.fix(twin, fixed_target(0.6, len(twin)), 1)
    assert torch.equal(weights.mu, twin.mu) and torch.equal(weights.fixed, twin.fixed)


@pytest.mark.parametrize("name", method_names())
def test_a_run_resumed_from_a_checkpoint_ends_bit_identical(name, trained_state, tmp_path):
    """Step, checkpoint, restore into a fresh model and method, continue: same as straight on."""

    def run(model: SignalNet) -> Compression:
        return Compression(model, quick_config(name), loader(), train={"epochs": 1}, seed=5)

    straight_model = SignalNet()
    straight_model.load_state_dict(trained_state)
    straight = run(straight_model)
    straight.convert()
    steps = straight.steps
    resumed_model = SignalNet()
    resumed_model.load_state_dict(trained_state)
    first = run(resumed_model)
    first.convert()
    first.run_step(steps[0])
    first.save(tmp_path / "step.safetensors")

    fresh_model = SignalNet()
    fresh = run(fresh_model)
    fresh.restore(tmp_path / "step.safetensors")
    for step in steps:
        straight.run_step(step)
    for step in steps[1:]:
        fresh.run_step(step)
    straight_final, fresh_final = straight.finalize(), fresh.finalize()
    state, again = straight_model.state_dict(), fresh_model.state_dict()
    assert set(state) == set(again)
    for key in state:
        assert torch.equal(state[key], again[key]), key
    assert straight_final == fresh_final


@pytest.mark.parametrize("name", method_names())
def test_conversion_leaves_norms_deterministic(name, trained_state):
    method = create_method(quick_config(name))
    model = SignalNet()
    model.load_state_dict(trained_state)
    report = method.convert(model)
    assert "bn.weight" in report.left and "conv1.weight" in report.converted
    assert {p.name for p in bayesian_params(model)} == set(report.converted)
    to_bayesian(model)  # converting again changes nothing
    assert {p.name for p in bayesian_params(model)} == set(report.converted)
