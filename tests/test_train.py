import copy

import pytest
import torch

from pwf_core.bayes import bayesian_params, fixed_masks, set_sigma_regulariser, to_bayesian
from pwf_core.config import OptimConfig
from pwf_core.data import TensorLoader
from pwf_core.train import train
from tests._dummies.models import TinyMLP


def _loader(seed: int = 0) -> TensorLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    y = torch.randint(0, 3, (64,), generator=generator)
    return TensorLoader(x, y, batch_size=8, shuffle=True, seed=seed)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_entries_stay_bit_exact(optimizer):
    torch.manual_seed(0)
    model = TinyMLP()
    to_bayesian(model, sigma_init=0.01)
    set_sigma_regulariser(model, reg=0.1)
    for param in bayesian_params(model):
        param.fixed_mask.copy_(torch.rand_like(param.mu) < 0.5)
    before = copy.deepcopy(model.state_dict())
    optim = OptimConfig(optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=0.1, grad_clip=1.0)
    result = train(
        model, _loader(), optim, epochs=3, fixed_masks=fixed_masks(model), progress=False
    )
    assert result.steps == 24
    for param in bayesian_params(model):
        mask = param.fixed_mask
        for name, tensor in ((param.name, param.mu), (f"{param.name}_sigma", param.sigma)):
            old = before[name]
            assert torch.equal(tensor.detach()[mask], old[mask]), name  # bit-identical
            assert not torch.equal(tensor.detach()[~mask], old[~mask]), name  # free ones moved


def test_regulariser_pushes_free_sigmas_only():
    torch.manual_seed(0)
    model = TinyMLP()
    to_bayesian(model, sigma_init=0.001)
    for param in bayesian_params(model):
        param.fixed_mask[..., 0] = True
    set_sigma_regulariser(model, reg=1.0, cap=0.05)
    optim = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, grad_clip=None)
    with_reg = copy.deepcopy(model)
    set_sigma_regulariser(model, reg=0.0)
    train(model, _loader(), optim, epochs=2, fixed_masks=fixed_masks(model), progress=False)
    train(with_reg, _loader(), optim, epochs=2, fixed_masks=fixed_masks(with_reg), progress=False)
    for plain, pushed in zip(bayesian_params(model), bayesian_params(with_reg), strict=True):
        free = ~plain.fixed_mask
        assert pushed.sigma[free].mean() > plain.sigma[free].mean() + 0.01
        assert torch.all(pushed.sigma[~free] == 0.001)


def test_training_is_deterministic_under_a_seed():
    def run() -> dict:
        torch.manual_seed(3)
        model = TinyMLP()
        to_bayesian(model, sigma_init=0.01)
        train(model, _loader(seed=3), OptimConfig(lr=0.05), epochs=2, progress=False)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fraction_of_an_epoch():
    model = TinyMLP()
    result = train(model, _loader(), OptimConfig(), epochs=0.25, progress=False)
    assert result.steps == 2  # ceil(0.25 * 8 batches)
    assert train(model, _loader(), OptimConfig(), epochs=0, progress=False).steps == 0
