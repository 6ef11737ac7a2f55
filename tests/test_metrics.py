import math

import pytest
import torch

from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.metrics import (
    classification_metrics,
    entropy_bits,
    expected_calibration_error,
    reliability_bins,
    weight_sharing_metrics,
)
from tests._dummies.models import TinyMLP


def test_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    # Bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10, 0.55 -> bin 8.
    # |1-0.9| + |0-0.8| + |1-0.7| + |1-0.55| over 4 samples.
    expected = (0.1 + 0.8 + 0.3 + 0.45) / 4
    assert math.isclose(expected_calibration_error(probs, labels), expected, rel_tol=1e-6)


def test_ece_shares_a_bin():
    probs = torch.tensor([[0.61, 0.39], [0.62, 0.38]])
    labels = torch.tensor([0, 1])
    # One bin (0.6, 0.667]: accuracy 0.5, mean confidence 0.615.
    assert math.isclose(expected_calibration_error(probs, labels), 0.115, rel_tol=1e-5)


def test_ece_uses_fifteen_bins():
    # 0.62 and 0.68 share the bin (0.6, 0.7] of 10 bins but not of 15 ((0.6, 0.667] and
    # (0.667, 0.733]): with 15 bins the gaps add, |1 - 0.62| + |0 - 0.68| over 2 = 0.53; with
    # 10 they would cancel into |0.5 - 0.65| = 0.15.
    probs = torch.tensor([[0.62, 0.38], [0.68, 0.32]])
    labels = torch.tensor([0, 1])
    assert math.isclose(expected_calibration_error(probs, labels), 0.53, rel_tol=1e-5)
    # 0.69 and 0.71 share (0.667, 0.733] of 15 bins but straddle 0.7, a 10-bin edge: one bin
    # with accuracy 0.5 and confidence 0.70 (10 bins would give 0.51).
    probs = torch.tensor([[0.69, 0.31], [0.71, 0.29]])
    assert math.isclose(expected_calibration_error(probs, labels), 0.2, rel_tol=1e-5)


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.62, 0.38], [0.68, 0.32], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1])
    bins = reliability_bins(probs, labels)
    assert len(bins["count"]) == 15 and sum(bins["count"]) == 3
    assert bins["count"][9] == 1 and bins["count"][10] == 1 and bins["count"][13] == 1
    assert bins["accuracy"][9] == 1.0 and bins["accuracy"][10] == 0.0
    assert math.isclose(bins["confidence"][13], 0.9, rel_tol=1e-6)


def test_classification_metrics_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    labels = torch.tensor([0, 1])
    metrics = classification_metrics(probs.log(), labels)
    assert metrics["cls/acc"] == 0.5
    assert metrics["cls/acc5"] == 1.0  # three classes: top-3
    assert math.isclose(metrics["cls/nll"], -(math.log(0.7) + math.log(0.3)) / 2, rel_tol=1e-6)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2)) / 2
    assert math.isclose(metrics["cal/brier"], brier, rel_tol=1e-6)
    assert set(metrics) == {"cls/acc", "cls/acc5", "cls/nll", "cal/brier", "cal/ece"}


def test_entropy_bits():
    assert entropy_bits(torch.tensor([1.0, 1.0, 2.0, 2.0])) == 1.0
    assert entropy_bits(torch.tensor([0.5, 0.25, 0.125, 0.0])) == 2.0
    assert entropy_bits(torch.ones(5)) == 0.0


def test_weight_sharing_metrics_whole_network():
    model = TinyMLP()
    to_bayesian(model)
    params = bayesian_params(model)
    for i, param in enumerate(params):
        param.mu.data.fill_(float(i % 2))  # weights and biases alternate between 0 and 1
    params[0].fixed_mask.fill_(True)
    metrics = weight_sharing_metrics(model)
    assert metrics["ws/unique_values"] == 2
    assert metrics["ws/unique_fixed_values"] == 1  # only the first tensor is fixed, all zeros
    total = sum(p.mu.numel() for p in params)
    assert metrics["ws/params_converted"] == total
    assert metrics["ws/params_other"] == 16  # the LayerNorm's weight and bias
    assert metrics["ws/fixed_fraction"] == pytest.approx(params[0].mu.numel() / total)
    ones = sum(p.mu.numel() for i, p in enumerate(params) if i % 2)
    p1 = ones / total
    expected = -(p1 * math.log2(p1) + (1 - p1) * math.log2(1 - p1))
    assert metrics["ws/entropy_bits"] == pytest.approx(expected)
