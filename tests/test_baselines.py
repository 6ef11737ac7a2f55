"""The baseline methods on hand-checkable inputs."""

import math

import pytest
import torch

from pwf_core.methods import FlatWeights
from pwf_core.methods.kmeans import kmeans_1d
from pwf_core.methods.nearest import fix_nearest_first
from pwf_core.methods.uniform import uniform_levels
from pwf_core.methods.wfn import wfn_codebook, wfn_fix_round


def flat(values) -> FlatWeights:
    mu = torch.tensor(values, dtype=torch.float32)
    return FlatWeights(mu, torch.zeros_like(mu), torch.zeros(len(mu), dtype=torch.bool))


def test_wfn_running_mean_acceptance_by_hand():
    centres = torch.tensor([-0.5, 0.0, 0.25, 0.5])
    weights = flat([0.26, 0.27, 0.24, 0.5, 0.49, 0.001])
    summary = wfn_fix_round(weights, 6, centres, delta=0.05, b=7)
    # 0.25 is nearest for three weights; sorted relative distances 0.0385 (0.26), 0.0417
    # (0.24), 0.0741 (0.27) have running means 0.0385, 0.0401, 0.0514: the prefix of two is
    # accepted. 0.5 takes both of its weights (means 0 and 0.0102); 0.001 < 2^-7 goes to 0
    # at distance 0. The last round must fix everything, so 0.27 falls back to its nearest.
    assert summary[["centre", "count"]].values.tolist() == [
        [0.25, 2],
        [0.5, 2],
        [0.0, 1],
        [0.25, 1],
    ]
    assert weights.mu.tolist() == [0.25, 0.25, 0.25, 0.5, 0.5, 0.0]


def test_wfn_quota_caps_the_prefix():
    weights = flat([0.26, 0.24, 0.5, 0.49])
    wfn_fix_round(weights, 1, torch.tensor([0.0, 0.25, 0.5]), delta=0.05, b=7)
    assert weights.fixed.tolist() == [True, False, False, False]  # nearest of the biggest centre


def test_wfn_ladder_approximates_each_rung():
    delta = 0.05
    centres = wfn_codebook(max_abs=1.0, delta=delta, b=5)
    assert 0.0 in centres and torch.equal(centres, -centres.flip(0))
    positive = centres[centres > 0]
    assert positive.min() == 2.0**-5
    rung, ratio = 2.0**-5, (1 + delta) / (1 - delta)
    while rung <= 1.0:
        nearest = positive[(positive - rung).abs().argmin()]
        assert abs(nearest - rung) < delta * rung + 1e-9
        rung *= ratio


def test_kmeans_finds_two_clusters():
    values = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
    assert torch.allclose(kmeans_1d(values, 2), torch.tensor([0.1, 5.1]))


def test_uniform_levels_are_symmetric_with_zero():
    levels = uniform_levels(1.5, bits=3)
    assert torch.allclose(levels, torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]))


@pytest.mark.parametrize("relative", [False, True])
def test_nearest_first_cut(relative):
    weights = flat([0.9, 0.52, 2.1, 0.05])
    fix_nearest_first(weights, 2, torch.tensor([0.0, 0.5, 1.0, 2.0]), relative=relative)
    distances = [0.1, 0.02, 0.1, 0.05]
    if relative:
        distances = [d / abs(w) for d, w in zip(distances, [0.9, 0.52, 2.1, 0.05], strict=True)]
    expected = sorted(range(4), key=lambda i: distances[i])[:2]
    assert weights.fixed.nonzero().squeeze(1).tolist() == sorted(expected)
    assert all(math.isclose(weights.mu[i], [1.0, 0.5, 2.0, 0.0][i]) for i in expected)
