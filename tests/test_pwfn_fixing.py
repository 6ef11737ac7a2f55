"""The PWFN fixing round: hand-worked greedy cases, a dense brute-force reference, invariants."""

import math

import numpy as np
import pytest
import torch

from pwf_core.methods import FlatWeights, fixed_target
from pwf_core.methods.pwfn.codebook import pow2_codebook
from pwf_core.methods.pwfn.fixing import _check_progress, _Relaxation, pwfn_fix_round
from pwf_core.methods.pwfn.variance import prior_sigma
from tests.test_codebook import plain_codebook

SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)


def flat(mu, sigma, fixed=None) -> FlatWeights:
    mu = torch.tensor(mu, dtype=torch.float32)
    sigma = torch.tensor(sigma, dtype=torch.float32)
    fixed = torch.zeros(len(mu), dtype=torch.bool) if fixed is None else torch.tensor(fixed)
    return FlatWeights(mu, sigma, fixed)


# Worked by hand with b = 2, so P = {0, 1/4, 1/2} for these magnitudes:
#   level (order 1, t=1): centres ±1/2, ±1/4, 0 (M = 0.76). 0.25 reaches w0 (d=0.5) and w1
#     (d=0.25): count 2, the most -> both fixed. Then 0 (w5) and 0.5 (w3) tie at 1; the lower
#     centre index, 0, goes first.
#   level (order 2, t=1): ±3/4 appear (3/4 <= M = 0.76): w4 (d=0.5).
#   level (order 2, t=2): M = 0.62 drops 3/4; w2 joins 1/4 (d=2) and w6 joins 1/2 (d=1.2).
HAND_MU = [0.26, 0.245, 0.27, 0.5, 0.76, -0.01, 0.62]
HAND_SIGMA = [0.02, 0.02, 0.01, 0.001, 0.02, 0.02, 0.1]


def test_hand_built_greedy_with_relaxation():
    weights = flat(HAND_MU, HAND_SIGMA)
    summary = pwfn_fix_round(weights, len(HAND_MU), threshold=1.0, b=2, zero_fix=False)
    rows = summary[["centre", "order", "threshold", "count"]].values.tolist()
    assert rows == [
        [0.25, 1, 1.0, 2],
        [0.0, 1, 1.0, 1],
        [0.5, 1, 1.0, 1],
        [0.75, 2, 1.0, 1],
        [0.25, 1, 2.0, 1],
        [0.5, 1, 2.0, 1],
    ]
    assert weights.mu.tolist() == [0.25, 0.25, 0.25, 0.5, 0.75, 0.0, 0.5]
    assert weights.fixed.all()


def test_quota_cut_takes_the_nearest_first():
    weights = flat(HAND_MU, HAND_SIGMA)
    summary = pwfn_fix_round(weights, 1, threshold=1.0, b=2, zero_fix=False)
    # 0.25 is chosen (two candidates) but only one fits: w1 (d=0.25) beats w0 (d=0.5).
    assert summary["count"].tolist() == [1]
    assert weights.fixed.tolist() == [False, True, False, False, False, False, False]
    assert weights.mu[0] == pytest.approx(0.26)


def test_relaxation_alternates_order_and_threshold():
    walk = _Relaxation(1.0, 2.0, max_order=4)
    levels = [(walk.order, walk.threshold)]
    for _ in range(7):
        walk.relax()
        levels.append((walk.order, walk.threshold))
    assert levels == [(1, 1), (2, 1), (2, 2), (3, 2), (3, 4), (4, 4), (4, 8), (4, 16)]
    short = _Relaxation(0.5, 3.0, max_order=2)
    for _ in range(4):
        short.relax()
    assert (short.order, short.threshold) == (2, 0.5 * 27)


def test_zero_fix_overrides_distance():
    # |0.2| < 2^-2: zero-fix sends it to 0 although 0.25 is within one sigma and 0 is not.
    on = flat([0.2, 0.3], [0.1, 0.1])
    pwfn_fix_round(on, 2, threshold=1.0, b=2, zero_fix=True)
    assert on.mu.tolist() == [0.0, 0.25]
    off = flat([0.2, 0.3], [0.1, 0.1])
    pwfn_fix_round(off, 2, threshold=1.0, b=2, zero_fix=False)
    assert off.mu.tolist() == [0.25, 0.25]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("std_mu", [0.0075, 0.0075]), ("keep", [0.02, 0.03]), ("divide_by_10", [0.002, 0.003])],
)
def test_sigma_join_rules(rule, expected):
    weights = flat([0.26, 0.245], [0.02, 0.03])
    pwfn_fix_round(weights, 2, threshold=1.0, b=2, zero_fix=False, sigma_join=rule)
    assert weights.sigma.tolist() == pytest.approx(expected)


def brute_force_round(mu, sigma, fixed, target, threshold, inc, b, max_order, zero_fix):
    """The round as the method notes state it, with a dense distance table and plain loops."""
    mu = [float(v) for v in mu]
    scale = [max(float(s), 2.0**-20) for s in sigma]
    free = [i for i in range(len(mu)) if not fixed[i]]
    remaining = target - (len(mu) - len(free))
    assignment = {}
    order, t, raise_order_next = 1, threshold, True
    while remaining > 0:
        centres = plain_codebook(b, max(abs(mu[i]) for i in free), order)

        def distance(i, c):
            if zero_fix and abs(mu[i]) < 2.0**-b:
                return 0.0 if c == 0 else math.inf
            return abs(c - mu[i]) / scale[i]

        while remaining > 0:
            counts = [sum(distance(i, c) <= t for i in free) for c in centres]
            k = int(np.argmax(counts))
            if counts[k] == 0:
                break
            members = sorted(
                (distance(i, centres[k]), i) for i in free if distance(i, centres[k]) <= t
            )
            for _, i in members[:remaining]:
                assignment[i] = centres[k]
                free.remove(i)
            remaining -= min(len(members), remaining)
        if raise_order_next and order < max_order:
            order, raise_order_next = order + 1, False
        else:
            t, raise_order_next = t * inc, True
    return assignment


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("zero_fix", [True, False])
def test_fast_path_matches_brute_force(seed, zero_fix):
    generator = torch.Generator().manual_seed(seed)
    n, b, max_order = 240, 5, 3
    mu = torch.randn(n, generator=generator) * 0.08
    mu[:5] = torch.tensor([0.0, 0.25, -0.125, 0.03125, 0.5])  # exact centres and a zero
    sigma = prior_sigma(mu) * (1 + torch.rand(n, generator=generator))
    weights = FlatWeights(mu.clone(), sigma.clone(), torch.zeros(n, dtype=torch.bool))
    for fraction, threshold in ((0.3, 1.0), (0.7, 0.5), (1.0, 2.0)):
        before_mu, before_fixed = weights.mu.clone(), weights.fixed.clone()
        target = fixed_target(fraction, n)
        expected = brute_force_round(
            before_mu, weights.sigma, before_fixed, target, threshold, 2.0, b, max_order, zero_fix
        )
        pwfn_fix_round(weights, target, threshold, 2.0, b, max_order, zero_fix)
        newly = (weights.fixed & ~before_fixed).nonzero().squeeze(1).tolist()
        assert sorted(newly) == sorted(expected)
        assert {i: float(weights.mu[i]) for i in newly} == expected


def test_round_invariants_on_conv_like_weights():
    torch.manual_seed(0)
    n, b = 20_000, 7
    mu = torch.randn(n) * 0.05
    weights = FlatWeights(mu.clone(), prior_sigma(mu), torch.zeros(n, dtype=torch.bool))
    used_centres = set()
    for fraction in SCHEDULE:
        previous_mu, previous_fixed = weights.mu.clone(), weights.fixed.clone()
        free_before = ~previous_fixed
        max_abs = float(previous_mu[free_before].abs().max())
        summary = pwfn_fix_round(weights, fixed_target(fraction, n), threshold=1.0, b=b)
        assert weights.num_fixed == math.ceil(fraction * n)
        # Earlier fixings never change.
        assert torch.equal(weights.mu[previous_fixed], previous_mu[previous_fixed])
        # Each new value is a centre of the order the summary gives, within the round's M.
        for centre, order in summary[["centre", "order"]].itertuples(index=False):
            assert centre in pow2_codebook(b, max_abs, int(order)).values
        newly = weights.fixed & ~previous_fixed
        assert set(weights.mu[newly].tolist()) <= set(summary["centre"])
        # Zero-fix: every weight below 2^-b that was fixed now went to 0.
        small = newly & (previous_mu.abs() < 2.0**-b)
        assert torch.all(weights.mu[small] == 0)
        used_centres |= set(summary["centre"])
    assert weights.fixed.all()
    assert torch.unique(weights.mu).numel() <= len(used_centres)


def test_nan_weights_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        pwfn_fix_round(flat([0.1, float("nan")], [0.01, 0.01]), 2)


@pytest.mark.parametrize("kind", ["negative", "zero", "tiny", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_degenerate_sigmas_terminate_and_match_brute_force(kind, seed):
    generator = torch.Generator().manual_seed(seed)
    n, b, max_order = 120, 5, 3
    mu = torch.randn(n, generator=generator) * 0.08
    sigma = prior_sigma(mu)
    broken = torch.rand(n, generator=generator) < 0.3
    values = {
        "negative": torch.full((n,), -0.01),
        "zero": torch.zeros(n),
        "tiny": torch.full((n,), 1e-12),
        "mixed": torch.tensor([-1.0, 0.0, 1e-30])[torch.arange(n) % 3],
    }[kind]
    sigma = torch.where(broken, values, sigma)
    weights = FlatWeights(mu.clone(), sigma.clone(), torch.zeros(n, dtype=torch.bool))
    for fraction in (0.5, 1.0):
        before = weights.fixed.clone()
        target = fixed_target(fraction, n)
        expected = brute_force_round(
            weights.mu.clone(), weights.sigma, before, target, 1.0, 2.0, b, max_order, True
        )
        pwfn_fix_round(weights, target, 1.0, 2.0, b, max_order, True)
        newly = (weights.fixed & ~before).nonzero().squeeze(1).tolist()
        assert {i: float(weights.mu[i]) for i in newly} == expected
    assert weights.fixed.all()


def test_distance_sigma_is_floored_at_two_to_minus_twenty():
    # 5e-7 from a centre with sigma 1e-9 (or 0): floored at 2^-20 ~ 9.5e-7 the distance is
    # ~0.52, within t = 1 at the first level; unfloored it would be 500 (or infinite).
    weights = flat([0.25 + 5e-7, -0.5 - 5e-7], [1e-9, 0.0])
    summary = pwfn_fix_round(weights, 2, threshold=1.0, b=3, zero_fix=False)
    assert summary[["centre", "order", "threshold"]].values.tolist() == [
        [-0.5, 1, 1.0],
        [0.25, 1, 1.0],
    ]


def test_a_level_that_cannot_progress_fails_instead_of_looping():
    walk = _Relaxation(1.0, 2.0, max_order=2)
    walk.order = 2
    with pytest.raises(RuntimeError, match="floored"):
        _check_progress(walk, 3, torch.tensor([0.1]), torch.tensor([0.0]))
    walk.threshold = 1e6  # every weight reaches every centre, yet nothing was fixed
    with pytest.raises(RuntimeError, match="made no progress"):
        _check_progress(walk, 3, torch.tensor([0.1, -0.3]), torch.tensor([0.01, 0.02]))
    walk.threshold = 1.0  # a level that could not reach anything: relaxing is right
    _check_progress(walk, 3, torch.tensor([0.1, -0.3]), torch.tensor([0.01, 0.02]))
