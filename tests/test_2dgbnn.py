"""2DGBNN: hand-checkable Gaussian algebra, the shared-weight forward, merging, export, the
promise on digits (accuracy, parameter count, calibration), and outliers that follow the
weights' scale."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from pwf_core import Compression, compress, load_compressed, save_compressed
from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.bayes import bayesian_params, sampling, to_bayesian
from pwf_core.config import load_config
from pwf_core.methods.gbnn2d.config import TwoDGBNNConfig
from pwf_core.methods.gbnn2d.gaussians import (
    cholesky_from,
    covariance_of,
    kl_2d,
    kmeans_2d,
    nearest_centres,
    parameters_from_covariance,
    w2_squared,
)
from pwf_core.methods.gbnn2d.merging import MergeRule, merge
from pwf_core.methods.gbnn2d.method import magnitude_threshold
from pwf_core.methods.gbnn2d.network import install, sharing_of
from pwf_core.methods.gbnn2d.sharing import SharedGaussians
from pwf_core.metrics import expected_calibration_error
from pwf_core.pretrain import build_experiment_model
from tests._dummies.models import TinyMLP
from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "2dgbnn.yaml"


def test_w2_of_two_hand_computed_gaussians():
    # Diagonal covariances commute: W2^2 = ||m1 - m2||^2 + ||S1^1/2 - S2^1/2||_F^2
    # = 25 + (1 - 2)^2 + (2 - 1)^2 = 27.
    m1, s1 = torch.tensor([[0.0, 0.0]]), torch.diag(torch.tensor([1.0, 4.0]))[None]
    m2, s2 = torch.tensor([[3.0, 4.0]]), torch.diag(torch.tensor([4.0, 1.0]))[None]
    assert w2_squared(m1, s1, m2, s2).item() == pytest.approx(27.0)
    assert w2_squared(m1, s1, m1, s1).item() == pytest.approx(0.0, abs=1e-6)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_w2_matches_the_matrix_square_root_formula():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20, 2, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(20, 2, 2, generator=generator, dtype=torch.float64)
    s1 = a @ a.transpose(1, 2) + 0.1 * torch.eye(2, dtype=torch.float64)
    s2 = b @ b.transpose(1, 2) + 0.1 * torch.eye(2, dtype=torch.float64)
    m1 = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    m2 = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    ours = w2_squared(m1, s1, m2, s2).numpy()
    for i in range(20):
        root = _sqrtm(s1[i].numpy())
        cross = _sqrtm(root @ s2[i].numpy() @ root)
        expected = ((m1[i] - m2[i]) ** 2).sum().item() + np.trace(
            s1[i].numpy() + s2[i].numpy() - 2 * cross
        )
        assert ours[i] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(1)
    mean_q, mean_p = torch.randn(5, 2, generator=generator), torch.randn(5, 2, generator=generator)
    diag_q, diag_p = torch.randn(5, 2, generator=generator), torch.randn(5, 2, generator=generator)
    off_q, off_p = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    expected = kl_divergence(
        MultivariateNormal(mean_q, scale_tril=cholesky_from(diag_q, off_q)),
        MultivariateNormal(mean_p, scale_tril=cholesky_from(diag_p, off_p)),
    ).sum()
    assert kl_2d(mean_q, diag_q, off_q, mean_p, diag_p, off_p).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_window_nearest_centre_is_exact():
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(5000, 2, generator=generator) * torch.tensor([0.05, 0.002])
    centres = torch.randn(300, 2, generator=generator) * torch.tensor([0.05, 0.02])
    index, distance = nearest_centres(points, centres, window=2)
    brute = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
    assert torch.equal(index, brute.argmin(1))
    assert torch.equal(distance, brute.min(1).values)


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(3)
    centres = torch.tensor([[-0.5, 0.01], [0.0, 0.02], [0.5, 0.01]])
    points = (centres[:, None, :] + 0.01 * torch.randn(3, 200, 2, generator=generator)).view(-1, 2)
    found, labels = kmeans_2d(points, 3)
    assert torch.allclose(found[found[:, 0].argsort()], centres, atol=0.005)
    assert len(set(labels.view(3, 200).mode(1).values.tolist())) == 3


def small_sharing(num_weights: int = 12) -> SharedGaussians:
    """Three Gaussians at mu = -0.3, 0.1, 0.4; one outlier; one blended point."""
    sharing = SharedGaussians(3, 1, 1, num_weights)
    sharing.means.data = torch.tensor([[-0.3, 0.01], [0.1, 0.01], [0.4, 0.01]])
    sharing.log_diag.data.fill_(math.log(0.01))
    sharing.outlier_mu.data = torch.tensor([2.0])
    sharing.outlier_log_sigma.data = torch.tensor([math.log(0.1)])
    for name in ("means", "log_diag", "offdiag", "outlier_mu", "outlier_log_sigma"):
        getattr(sharing, f"prior_{name}").copy_(getattr(sharing, name).detach())
    sharing.member.copy_(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, -1, 1][:num_weights]))
    sharing.outlier_index.copy_(torch.tensor([10]))
    sharing.blend_index = torch.tensor([11])
    sharing.blend_pair = torch.tensor([[1, 2]])
    sharing.blend_alpha = torch.tensor([0.25])
    return sharing


def mlp_with_sharing() -> tuple[nn.Module, SharedGaussians]:
    model = nn.Sequential(nn.Linear(3, 4, bias=False))  # 12 weights
    to_bayesian(model, attrs=("weight",))
    sharing = small_sharing()
    install(model, sharing)
    return model, sharing


def test_members_of_a_gaussian_share_one_sample_per_forward():
    model, _ = mlp_with_sharing()
    seen = []
    model[0].register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.detach().clone())
    )
    model.train()
    torch.manual_seed(0)
    model(torch.randn(2, 3))
    flat = seen[0].flatten()
    groups = [flat[0:3], flat[3:6], flat[6:10]]
    for group in groups:
        assert torch.unique(group).numel() == 1  # one value for all members of a Gaussian
    assert len({float(g[0]) for g in groups}) == 3  # different Gaussians, different values
    assert flat[10] not in [float(g[0]) for g in groups]  # the outlier has its own value
    model(torch.randn(2, 3))
    assert not torch.equal(seen[1].flatten()[:3], flat[:3])  # a new forward, a new sample


def test_a_blended_weight_lies_between_its_two_gaussians():
    _, sharing = mlp_with_sharing()
    means = sharing.flat_weights(sample=False)
    assert means[11].item() == pytest.approx(0.25 * 0.1 + 0.75 * 0.4)
    torch.manual_seed(5)
    sampled = sharing.flat_weights(sample=True)
    first, second = sampled[3].item(), sampled[6].item()  # members of Gaussians 1 and 2
    assert min(first, second) <= sampled[11].item() <= max(first, second)
    assert sampled[11].item() == pytest.approx(0.25 * first + 0.75 * second, rel=1e-6)


def test_merging_reduces_the_count_and_keeps_every_member():
    sharing = SharedGaussians(4, 0, 0, 8)
    sharing.means.data = torch.tensor([[0.1, 0.01], [0.1001, 0.01], [0.5, 0.01], [0.9, 0.01]])
    sharing.log_diag.data.fill_(math.log(0.001))
    for name in ("means", "log_diag", "offdiag"):
        getattr(sharing, f"prior_{name}").copy_(getattr(sharing, name).detach())
    sharing.member.copy_(torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]))
    points = torch.stack([sharing.means[sharing.member, 0].detach(), torch.full((8,), 0.01)], 1)
    merged = merge(sharing, points, MergeRule(tau_d=1e-6, tau_g=math.inf, tau_v=1.0))
    assert merged == 1 and sharing.num_gaussians == 3
    assert sharing.member.tolist() == [0, 0, 0, 0, 0, 1, 2, 2]
    assert sharing.means[0, 0].item() == pytest.approx((2 * 0.1 + 3 * 0.1001) / 5)
    assert merge(sharing, points, MergeRule(tau_d=1e-12, tau_g=math.inf, tau_v=1.0)) == 0


@pytest.fixture(scope="module")
def digits_run(digits, pretrained_state):
    config = load_config(CONFIG)
    model = build_experiment_model(config, digits)
    model.load_state_dict(pretrained_state[0])
    run = Compression(
        model,
        config.compression,
        digits.loader("train", 64, shuffle=True, seed=1),
        eval_loader=digits.loader("test", 512),
        seed=0,
        progress=False,
    )
    run.convert()
    records = [run.run_step(step) for step in run.steps]
    return run, records, run.finalize()


@pytest.mark.slow
def test_on_digits_the_shared_model_keeps_the_bnns_accuracy(digits_run, pretrained_state):
    """The issue's promise: top-1 within 2 points of the mean-field BNN with at least 20x fewer
    trainable parameters, and an ECE no worse than the deterministic model's."""
    _, records, final = digits_run
    deterministic = pretrained_state[1].test_metrics
    assert final["cls/acc"] >= final["meanfield/cls/acc"] - 0.02
    assert final["meanfield/size/trainable_params"] >= 20 * final["size/trainable_params"]
    assert final["cal/ece"] <= deterministic["cal/ece"]
    assert final["size/bytes"] < final["deterministic/size/bytes"] < final["meanfield/size/bytes"]
    gaussians = [r.metrics["ws/shared_values"] for r in records if "ws/shared_values" in r.metrics]
    assert gaussians[0] == 237 and gaussians[-1] < gaussians[0]  # sqrt(N) at first, then merged
    assert all(b <= a for a, b in itertools.pairwise(gaussians))


@pytest.mark.slow
def test_sampled_final_metrics_match_an_independent_average(digits_run, digits):
    """The stochastic model's ``sampled/*``: the softmax of ``eval_samples`` averaged logits
    under the final-eval seed, recomputed here by hand."""
    run, _, final = digits_run
    samples = load_config(CONFIG).compression.eval_samples
    images, labels = next(iter(digits.loader("test", 512)))  # one batch holds the test split
    seed_everything(derive_seed(0, "final-eval"))
    with torch.no_grad(), sampling(run.model.eval(), True):
        logits = torch.stack([run.model(images).float() for _ in range(samples)]).mean(0)
    probs = logits.softmax(1)
    assert final["sampled/cal/ece"] == pytest.approx(expected_calibration_error(probs, labels))
    assert final["sampled/cls/acc"] == pytest.approx((probs.argmax(1) == labels).float().mean())
    assert final["sampled/cls/nll"] != final["mean/cls/nll"]  # sampling really changed weights


@pytest.mark.slow
def test_cholesky_factors_stay_valid_through_training(digits_run):
    run, _, _ = digits_run
    sharing = sharing_of(run.model)
    factors = sharing.factors()
    assert torch.all(torch.diagonal(factors, dim1=1, dim2=2) > 0)
    torch.linalg.cholesky(covariance_of(factors))  # SPD: raises otherwise
    # Even a step that pushes the log-diagonals far negative leaves a valid factor.
    log_diag, offdiag = parameters_from_covariance(covariance_of(factors))
    assert torch.all(cholesky_from(log_diag - 50, offdiag).diagonal(dim1=1, dim2=2) > 0)


@pytest.mark.slow
def test_export_and_load_give_identical_seeded_predictions(digits_run, digits, tmp_path):
    run, _, _ = digits_run
    report = save_compressed(run.model, tmp_path / "gbnn.safetensors")
    loaded = load_compressed(report.path, model=build_experiment_model(load_config(CONFIG), digits))
    assert sharing_of(loaded).num_gaussians == sharing_of(run.model).num_gaussians
    images = next(iter(digits.loader("test", 128)))[0]

    def predictions(model: nn.Module) -> torch.Tensor:
        torch.manual_seed(7)
        with torch.no_grad(), sampling(model.eval(), True):
            return torch.stack([model(images) for _ in range(5)])

    assert torch.equal(predictions(loaded), predictions(run.model))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), run.model.eval()(images))  # the means
    assert report.file_bytes < report.float32_bytes / 2
    # The members' indices entropy-coded: within 5 % of their bound plus the header.
    assert report.file_bytes <= 1.05 * (report.entropy_bound_bytes + report.header_bytes)
    assert report.file_bytes < report.fixed_length_bytes


def test_strip_keeps_the_mean_weights():
    model, sharing = mlp_with_sharing()
    means = sharing.flat_weights(sample=False).detach().clone()
    from pwf_core import strip

    strip(model)
    assert type(model[0]) is nn.Linear and sharing_of(model) is None
    assert torch.equal(model[0].weight.detach().flatten(), means)
    assert set(model.state_dict()) == {"0.weight"}


def test_biases_stay_deterministic():
    from pwf_core.registry import create_method

    model = TinyMLP()
    report = create_method({"method": "2dgbnn"}).convert(model)
    assert set(report.converted) == {"fc1.weight", "fc2.weight"}
    assert {"fc1.bias", "fc2.bias", "norm.weight"} <= set(report.left)
    assert all(p.attr == "weight" for p in bayesian_params(model))


# -- tau_w: auto ----------------------------------------------------------------------------


def test_auto_tau_w_is_the_99_9th_percentile_of_the_magnitudes():
    # |mu| = 0.001, 0.002, ..., 2.000 with alternating signs: round(0.001 * 2000) = 2 weights
    # (2.000 and 1.999) are outliers, so the threshold is the second largest, 1.999.
    mu = torch.arange(1, 2001, dtype=torch.float32) / 1000 * torch.tensor([1.0, -1.0]).repeat(1000)
    threshold = magnitude_threshold(mu, "auto")
    assert threshold == pytest.approx(1.999)
    assert int((mu.abs() >= threshold).sum()) == 2
    # Scaled 100x, the threshold scales with the weights and the share stays the same.
    assert magnitude_threshold(100 * mu, "auto") == pytest.approx(199.9)
    assert int((100 * mu.abs() >= magnitude_threshold(100 * mu, "auto")).sum()) == 2
    # Under 500 weights: the largest alone; a number is an absolute threshold.
    assert magnitude_threshold(torch.tensor([0.1, -0.7, 0.3]), "auto") == pytest.approx(0.7)
    assert magnitude_threshold(mu, 0.2) == 0.2


def test_tau_w_is_auto_by_default_and_a_positive_number_otherwise():
    assert TwoDGBNNConfig().tau_w == "auto"
    assert TwoDGBNNConfig(tau_w=0.2).tau_w == 0.2
    assert TwoDGBNNConfig(tau_w=1).tau_w == 1.0
    for bad in (0, -0.5, "big", math.inf):
        with pytest.raises(ValidationError, match="positive finite number or 'auto'"):
            TwoDGBNNConfig(tau_w=bad)


class LargeWeightConv1d(nn.Module):
    """A user's Conv1d network over the digits' 8 rows (8 channels of length 8), with batch
    norm after every layer but the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(8, 32, 3, padding=1),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Conv1d(32, 64, 3, padding=1),
            nn.BatchNorm1d(64),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(512, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.flatten(1, 2)))


@pytest.fixture(scope="module")
def large_weight_net(digits) -> tuple[dict[str, torch.Tensor], int]:
    """A trained :class:`LargeWeightConv1d` whose weights are then scaled 10x in front of
    its batch norms (the function is unchanged), so that most ``|w|`` exceed 0.2: its state
    and number of conv/linear weights."""
    torch.manual_seed(0)
    net = LargeWeightConv1d()
    optimiser = torch.optim.Adam(net.parameters(), 3e-3)
    for epoch in range(6):
        for images, labels in digits.loader("train", 64, shuffle=True, seed=epoch):
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(images), labels).backward()
            optimiser.step()
    scale = 10.0
    with torch.no_grad():
        pairs = [(net.features[0], net.features[1]), (net.features[3], net.features[4])]
        for layer, norm in [*pairs, (net.head[1], net.head[2])]:
            layer.weight *= scale
            layer.bias *= scale
            norm.running_mean *= scale
            norm.running_var *= scale**2
    weights = torch.cat(
        [m.weight.flatten() for m in net.modules() if isinstance(m, nn.Conv1d | nn.Linear)]
    )
    assert (weights.abs() > 0.2).float().mean() > 0.6  # most weights are "large"
    return net.state_dict(), len(weights)


def _compress_large_weight_net(digits, state, tau_w: float | str, epochs: int) -> dict:
    net = LargeWeightConv1d()
    net.load_state_dict(state)
    knobs = {"bnn_epochs": epochs, "vi_epochs": epochs, "step_samples": 4, "eval_samples": 10}
    frame = compress(
        net,
        digits.loader("train", 64, shuffle=True, seed=1),
        {"method": "2dgbnn", "tau_w": tau_w, **knobs},
        eval_loader=digits.loader("test", 512),
        progress=False,
    )
    return frame.attrs["final"]


@pytest.mark.slow
def test_auto_tau_w_keeps_the_papers_outlier_share_on_a_large_weight_network(
    digits, large_weight_net
):
    """The issue's promise: about 1 % outliers (asserted <= 3 %: magnitude, gradient and
    small-cluster outliers together), >= 20x fewer trainable parameters than the mean-field
    BNN, and a sampled NLL no worse than the mean-field BNN's (S = 10 averaged logits both)."""
    state, num_weights = large_weight_net
    final = _compress_large_weight_net(digits, state, "auto", epochs=2)
    assert final["bnn/tau_w"] > 1.0  # "auto" followed the weights' scale, far above 0.2
    assert final["ws/outliers"] <= 0.03 * num_weights
    assert final["meanfield/size/trainable_params"] >= 20 * final["size/trainable_params"]
    assert final["sampled/cls/nll"] <= final["meanfield/cls/nll"]


@pytest.mark.slow
def test_the_absolute_0_2_makes_most_of_a_large_weight_networks_weights_outliers(
    digits, large_weight_net
):
    """What ``auto`` fixes: the paper's absolute threshold leaves little shared (one epoch a
    stage is enough: the magnitude rule alone decides the share)."""
    state, num_weights = large_weight_net
    final = _compress_large_weight_net(digits, state, 0.2, epochs=1)
    assert final["bnn/tau_w"] == 0.2
    assert final["ws/outliers"] > 0.5 * num_weights
    assert final["meanfield/size/trainable_params"] < 5 * final["size/trainable_params"]
