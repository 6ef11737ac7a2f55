import copy

import pytest
import torch
from torch import nn

from pwf_core.bayes import (
    SIGMA_FLOOR,
    add_sigma_regulariser_,
    bayesian_params,
    sampling,
    set_sigma_regulariser,
    to_bayesian,
)
from pwf_core.models import build_model
from tests._dummies.models import TinyMLP

FAMILIES = [
    ("small_cnn", 1, 8, {}),
    ("test_resnet", 3, 16, {}),
    ("test_efficientnet", 3, 16, {"pad_type": "same"}),  # timm's Conv2dSame
    ("test_byobnet", 3, 16, {}),
    ("test_vit", 3, 16, {"patch_size": 4}),  # attention Linear layers
]


def _pair(name, chans, size, kwargs):
    torch.manual_seed(0)
    original = build_model(name, num_classes=5, in_chans=chans, img_size=size, **kwargs)
    converted = copy.deepcopy(original)
    report = to_bayesian(converted)
    return original.eval(), converted.eval(), report, torch.randn(4, chans, size, size)


@pytest.mark.parametrize(("name", "chans", "size", "kwargs"), FAMILIES)
def test_sampling_off_gives_identical_logits(name, chans, size, kwargs):
    original, converted, report, x = _pair(name, chans, size, kwargs)
    with torch.no_grad():
        assert torch.equal(original(x), converted(x))
    # Parameter names are the original ones; sigmas and masks are added beside them.
    original_names = set(original.state_dict())
    assert original_names <= set(converted.state_dict())
    assert report.converted and all(
        f"{n}_sigma" in converted.state_dict() for n in report.converted
    )
    assert report.num_converted + report.num_left == sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize(("name", "chans", "size", "kwargs"), FAMILIES)
def test_sampling_on_varies_with_sigma(name, chans, size, kwargs):
    _, converted, _, x = _pair(name, chans, size, kwargs)

    def logit_std(sigma: float) -> float:
        for param in bayesian_params(converted):
            param.sigma.data.fill_(sigma)
        torch.manual_seed(1)
        with torch.no_grad(), sampling(converted, True):
            draws = torch.stack([converted(x) for _ in range(8)])
        return draws.std(0).mean().item()

    small, large = logit_std(1e-3), logit_std(3e-2)
    assert 0 < small < large


def test_timm_subclasses_and_left_parameters_are_reported():
    _, converted, report, _ = _pair("test_efficientnet", 3, 16, {"pad_type": "same"})
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "BayesianConv2dSame" in kinds
    assert any("bn" in name for name in report.left)  # norms stay deterministic
    _, _, vit_report, _ = _pair("test_vit", 3, 16, {"patch_size": 4})
    assert any(name.endswith("attn.qkv.weight") for name in vit_report.converted)
    assert {"cls_token", "pos_embed"} <= set(vit_report.left)


def test_train_mode_samples_eval_mode_does_not():
    torch.manual_seed(0)
    model = TinyMLP()
    to_bayesian(model, sigma_init=0.1)
    x = torch.randn(5, 4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    with sampling(model, True):
        assert not torch.equal(model(x), model(x))
    assert torch.equal(model(x), model(x))  # the context restored eval behaviour
    assert isinstance(model.fc1.weight, nn.Parameter)  # outside forward: the mean


def test_conversion_keeps_module_api(tmp_path):
    model = TinyMLP()
    to_bayesian(model)
    assert to_bayesian(model).num_converted == 4 * 8 + 8 + 8 * 3 + 3  # idempotent
    state = model.state_dict()
    assert {"fc1.weight", "fc1.weight_sigma", "fc1.weight_fixed_mask", "norm.weight"} <= set(state)
    clone = TinyMLP()
    to_bayesian(clone)
    clone.load_state_dict(state)
    x = torch.randn(2, 4)
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))
    model.to(torch.float64)
    assert model.fc1.weight_sigma.dtype == torch.float64


def test_sampled_weight_gradients_match_the_formula():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    to_bayesian(layer)
    layer.weight_sigma.data = torch.tensor([[0.01, 0.2, 1e-40], [0.04, 0.05, 0.06]])
    set_sigma_regulariser(layer, reg=0.5, cap=0.05)
    x = torch.randn(4, 3)
    layer.train()
    out = layer(x)
    eps = layer.__dict__["_pwf_noise"]["weight"][0].clone()
    grad_w = torch.randn(4, 2)
    out.backward(grad_w)
    upstream = grad_w.t() @ x  # dL/dw
    assert torch.allclose(layer.weight.grad, upstream)
    expected = upstream * eps
    expected[0, 2] = 0.0  # sigma below the floor: clamped, no data gradient
    sigma = layer.weight_sigma.detach()
    expected -= 0.5 * torch.relu(0.05 - sigma) * eps.abs()
    assert torch.allclose(layer.weight_sigma.grad, expected, atol=1e-7)


def test_regulariser_only_below_the_cap():
    sigma = torch.tensor([0.01, 0.04, 0.05, 0.2])
    eps = torch.tensor([1.0, -2.0, 3.0, -1.0])
    grad = torch.zeros(4)
    add_sigma_regulariser_(grad, sigma, eps, reg=2.0, cap=0.05)
    # -reg * relu(cap - sigma) * |eps|: pushes sigma up (negative gradient) below the cap only.
    assert torch.allclose(grad, torch.tensor([-0.08, -0.04, 0.0, 0.0]))
    assert SIGMA_FLOOR == 2.0**-30


def test_second_sampling_forward_before_backward_is_refused():
    # The noise buffer is refilled in place, so a pending backward must not see new noise.
    layer = nn.Linear(3, 2)
    to_bayesian(layer, sigma_init=0.1)
    layer.train()
    x = torch.randn(4, 3)
    first = layer(x).sum()
    layer(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
