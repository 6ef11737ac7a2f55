"""``train.compile``: converted models compile whole (``fullgraph=True``) for PWFN and both
2DGBNN stages, give eager's logits with sampling off, sample and train with it on, and keep
fixed entries bit-exact.

Tolerance: Inductor fuses and reorders float32 arithmetic (a convolution's bias, a BatchNorm's
affine, the sampled weight ``mu + sigma eps``), so compiled logits match eager ones to about
1e-6 of their scale, not bit for bit; the bar is 1e-4 of the largest logit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwf_core
from pwf_core.bayes import bayesian_params, sampling, set_sigma_regulariser, to_bayesian
from pwf_core.methods.gbnn2d import TwoDGBNNConfig
from pwf_core.methods.gbnn2d.method import TwoDGBNN
from pwf_core.methods.pwfn.variance import DEFAULT_REG, init_sigma_
from pwf_core.models import build_model
from pwf_core.train import OptimConfig, compiled, train

pytestmark = pytest.mark.slow  # each case compiles a model: 10-60 s on a CPU

MODELS = {"small_cnn": (1, 8), "resnet18": (3, 32)}


@pytest.fixture(autouse=True)
def _fresh_compiler():
    """Each case starts with empty compile caches, as a new process would."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    chans, size = MODELS[name]
    return build_model(name, num_classes=10, in_chans=chans, img_size=size)


def _pwfn(model: nn.Module) -> None:
    to_bayesian(model)
    init_sigma_(model)
    set_sigma_regulariser(model, DEFAULT_REG)


def _meanfield(model: nn.Module) -> None:
    TwoDGBNN(TwoDGBNNConfig()).convert(model)


def _shared(model: nn.Module) -> None:
    method = TwoDGBNN(TwoDGBNNConfig(gaussians=16, min_cluster_size=2))
    method.convert(model)
    method.build_mixture(model)


CASES = [
    ("small_cnn", "pwfn", _pwfn),
    ("small_cnn", "2dgbnn-meanfield", _meanfield),
    ("small_cnn", "2dgbnn-shared", _shared),
    ("resnet18", "pwfn", _pwfn),
]


@pytest.mark.parametrize(("name", "stage", "convert"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_converted_model_compiles_whole_and_matches_eager(name, stage, convert):
    model = _model(name)
    convert(model)
    model.train()
    chans, size = MODELS[name]
    images = torch.randn(4, chans, size, size, generator=torch.Generator().manual_seed(1))
    network = compiled(model)  # fullgraph=True: a graph break fails here
    with sampling(model, False):
        eager = model(images)
        fast = network(images)
    assert torch.allclose(fast, eager, rtol=0, atol=1e-4 * eager.abs().max().item())
    # Sampling on: every forward draws new weights, and the backward reaches every sigma.
    # (One backward per forward: a layer's noise buffer is reused by its next forward.) The
    # second forward keeps grad mode on: under no_grad the model would compile a third time.
    first = network(images)
    first.sum().backward()
    second = network(images).detach()
    assert not torch.allclose(first, second) and not torch.allclose(first, eager)
    if stage == "2dgbnn-shared":
        sharing = model._pwf_sharing
        assert sharing.log_diag.grad is not None and sharing.log_diag.grad.abs().sum() > 0
    else:
        assert all(p.sigma.grad is not None for p in bayesian_params(model))


def _digit_batches(n: int = 256) -> DataLoader:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target[:n])
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def test_compiled_training_samples_trains_and_keeps_fixed_entries_exact():
    model = _model("small_cnn")
    _pwfn(model)
    for param in bayesian_params(model):
        param.fixed_mask.view(-1)[::2] = True
    before = {p.name: p.mu.detach().clone() for p in bayesian_params(model)}
    sigmas = {p.name: p.sigma.detach().clone() for p in bayesian_params(model)}
    masks = {t: p.fixed_mask for p in bayesian_params(model) for t in (p.mu, p.sigma)}
    optim = OptimConfig(lr=0.05, compile=True)
    result = train(model, _digit_batches(), optim, 4, fixed_masks=masks, progress=False)
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0]  # it learns
    for param in bayesian_params(model):
        mask = param.fixed_mask
        assert torch.equal(param.mu[mask], before[param.name][mask])  # bit-exact
        assert torch.equal(param.sigma[mask], sigmas[param.name][mask])
        assert not torch.equal(param.mu[~mask], before[param.name][~mask])  # the free ones moved


def test_compiled_runs_reproduce_under_a_seed():
    """Compiled noise is not eager noise, but a seeded compiled run gives the same model."""
    loader = _digit_batches(128)
    method = {"method": "pwfn", "schedule": [0.5, 1.0]}
    runs = []
    for _ in range(2):
        model = _model("small_cnn")
        pwf_core.compress(
            model, loader, method, train={"epochs": 1, "compile": True}, seed=3, progress=False
        )
        runs.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_2dgbnn_runs_both_stages_compiled():
    loader = _digit_batches(128)
    model = _model("small_cnn")
    frame = pwf_core.compress(
        model,
        loader,
        {"method": "2dgbnn", "bnn_epochs": 1, "vi_epochs": 2, "gaussians": 16},
        eval_loader=loader,
        train={"compile": True},
        progress=False,
    )
    assert set(frame["stage"]) >= {"bnn", "vi"}
    assert frame.attrs["final"]["cls/acc"] > 0.1


def test_a_new_regulariser_strength_reuses_the_compiled_graph():
    """A sweep over ``reg`` in one process: strengths are graph inputs, not constants (as
    floats, every trial compiled the model again and the ninth hit the recompile limit)."""
    loader = _digit_batches(64)
    optim = OptimConfig(lr=0.05, compile=True)
    for trial, reg in enumerate((1e-4, 3e-4, 0.0)):
        model = _model("small_cnn")
        to_bayesian(model)
        init_sigma_(model)
        set_sigma_regulariser(model, reg)
        with torch._dynamo.config.patch(error_on_recompile=trial == 1):
            train(model, loader, optim, 1, progress=False)
