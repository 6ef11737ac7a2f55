import copy

import pytest
import torch

from pwf_core.bayes import bayesian_params, fixed_masks, set_sigma_regulariser, to_bayesian
from pwf_core.config import OptimConfig
from pwf_core.data import TensorLoader
from pwf_core.train import MaskedParams, train
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


def test_restore_clears_optimiser_state_of_fixed_entries_only():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    mask = torch.tensor([True, False, True, False])
    masked = MaskedParams({param: mask})
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    optimizer.state[param] = {
        "momentum_buffer": torch.tensor([5.0, 6.0, 7.0, 8.0]),
        "step": torch.tensor(9.0),
    }
    with torch.no_grad():
        param.add_(10.0)  # what an optimiser step did to every entry
    masked.restore(optimizer)
    assert param.tolist() == [1.0, 12.0, 3.0, 14.0]  # fixed entries back, free ones kept
    assert optimizer.state[param]["momentum_buffer"].tolist() == [0.0, 6.0, 0.0, 8.0]
    assert optimizer.state[param]["step"] == 9.0  # scalar state is not a per-entry buffer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_free_entries_train_exactly_as_without_masks(optimizer):
    """Masking must not disturb the free entries: their path equals a plain optimiser's whose
    fixed values are simply put back after every step (elementwise updates are separable)."""
    torch.manual_seed(0)
    model = TinyMLP()
    for param in model.parameters():
        param.requires_grad_(True)
    masks = {p: torch.rand_like(p) < 0.5 for p in model.parameters()}
    reference = copy.deepcopy(model)
    optim = OptimConfig(
        optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=0.1, grad_clip=None
    )
    train(model, _loader(), optim, epochs=2, fixed_masks=masks, progress=False)

    from pwf_core.train import build_optimizer

    ref_masks = dict(zip(reference.parameters(), masks.values(), strict=True))
    saved = {p: p.detach().clone() for p in reference.parameters()}
    ref_optimizer = build_optimizer(reference, optim)
    loader = _loader()
    reference.train()
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(reference(x), y)
            ref_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in ref_masks.items():
                p.grad.masked_fill_(m, 0.0)
            ref_optimizer.step()
            with torch.no_grad():
                for p, m in ref_masks.items():
                    p[m] = saved[p][m]
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), name
