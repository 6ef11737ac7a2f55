import math

import torch

from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.methods.pwfn.variance import (
    PRIOR_SCALE,
    init_sigma_,
    pow2_relative_distance,
    prior_sigma,
    quantile,
)
from tests._dummies.models import TinyMLP


def test_relative_distance_by_hand():
    mu = torch.tensor([0.75, -0.75, 0.25, 0.0, 3.0])
    r = pow2_relative_distance(mu)
    # 0.75 sits between 0.5 and 1: |(0.75-1)/0.75| * |(0.75-0.5)/0.75| = 1/3 * 1/3.
    assert torch.allclose(r, torch.tensor([1 / 9, 1 / 9, 0.0, 0.0, (1 / 3) * (1 / 3)]))


def test_prior_sigma_by_hand():
    mu = torch.tensor([0.75, 0.25, 0.0, 3.0, 0.375])
    sigma = prior_sigma(mu)
    r = torch.tensor([1 / 9, 0.0, 0.0, 1 / 9, 1 / 9])
    q75 = quantile(r, 0.75)
    assert math.isclose(q75.item(), 1 / 9, rel_tol=1e-6)
    # A power of two and zero get the minimum; no NaN anywhere.
    assert sigma[1] == 2.0**-30 and sigma[2] == 2.0**-30
    assert torch.isfinite(sigma).all()
    assert torch.allclose(sigma[[0, 3, 4]], torch.full((3,), PRIOR_SCALE))


def test_prior_sigma_is_capped_and_handles_all_powers_of_two():
    mu = torch.tensor([0.75, 0.5, 0.5, 0.5, 0.5, 0.5])  # q75 of r is 0
    assert torch.equal(prior_sigma(mu), torch.full_like(mu, 2.0**-30))
    assert prior_sigma(torch.tensor([0.75, 0.7, 1.0, 1.0]), cap=1e-3).max() == 1e-3


def test_quantile_matches_torch():
    values = torch.randn(1001)
    for q in (0.0, 0.3, 0.75, 1.0):
        assert torch.allclose(quantile(values, q), torch.quantile(values, q))


def test_init_sigma_covers_weights_and_biases():
    model = TinyMLP()
    model.fc1.weight.data[0, 0] = 0.0
    to_bayesian(model)
    init_sigma_(model)
    for param in bayesian_params(model):
        assert torch.isfinite(param.sigma).all()
        assert torch.equal(param.sigma.data, prior_sigma(param.mu))
    init_sigma_(model, prior=False, constant=1e-4)
    assert all(torch.all(p.sigma == 1e-4) for p in bayesian_params(model))


# Eight powers of two (r = 0), one weight just above 0.5 and two at 0.75 (r = 1/9). The
# 0.75-quantile of the eleven r values sits halfway between the eighth zero and r(0.5 + 2^-8),
# so that weight gets exactly 0.0025 * r / (r / 2) = 0.005, and the two at 0.75 get
# 0.0025 * (1/9) / (r / 2) = 0.073, above the cap: exactly 0.05.
PINNED_MU = [0.5] * 8 + [0.5 + 2**-8, 0.75, 0.75]
PINNED_SIGMA = [2.0**-30] * 8 + [0.005, 0.05, 0.05]


def test_prior_scale_and_cap_pinned_by_value():
    sigma = prior_sigma(torch.tensor(PINNED_MU, dtype=torch.float64))
    assert torch.allclose(sigma, torch.tensor(PINNED_SIGMA, dtype=torch.float64), rtol=1e-9)


def test_init_sigma_applies_the_cap():
    model = torch.nn.Linear(11, 1, bias=False)
    model.weight.data = torch.tensor([PINNED_MU])
    to_bayesian(model)
    init_sigma_(model)
    assert torch.allclose(model.weight_sigma.data, torch.tensor([PINNED_SIGMA]), rtol=1e-5)
    assert model.weight_sigma.max() == 0.05
