"""Metrics with namespaced keys: ``cls/*`` accuracy and likelihood, ``cal/*`` calibration,
``ws/*`` weight sharing (unique values, entropy, parameter counts)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pwf_core.bayes import bayesian_params, conversion_report, sampling

ECE_BINS = 15


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS
) -> float:
    """ECE with ``n_bins`` equal-width confidence bins ``(k/n, (k+1)/n]``.

    ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over the top-1 confidence.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(probs.dtype)
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)[1:-1]
    bins = torch.bucketize(confidence, inner_edges, right=False)
    gap = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    gap.index_add_(0, bins, correct - confidence)
    return (gap.abs().sum() / len(labels)).item()


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS
) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and sample count (the bins of
    :func:`expected_calibration_error`), for a reliability diagram."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(probs.dtype)
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)[1:-1]
    bins = torch.bucketize(confidence, inner_edges, right=False)
    count = torch.bincount(bins, minlength=n_bins).to(probs.dtype)
    confidence_sum = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    correct_sum = torch.zeros_like(confidence_sum)
    confidence_sum.index_add_(0, bins, confidence)
    correct_sum.index_add_(0, bins, correct)
    safe = count.clamp_min(1)
    return {
        "lower": torch.linspace(0, 1, n_bins + 1)[:-1].tolist(),
        "upper": torch.linspace(0, 1, n_bins + 1)[1:].tolist(),
        "confidence": (confidence_sum / safe).tolist(),
        "accuracy": (correct_sum / safe).tolist(),
        "count": count.tolist(),
    }


def classification_metrics(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 accuracy, NLL, Brier score and ECE from per-class log-probabilities.

    Args:
        log_probs: ``(N, C)`` log-probabilities (rows sum to one in probability space).
        labels: ``(N,)`` class indices.
    """
    probs = log_probs.exp()
    k = min(5, log_probs.shape[1])
    top_k = log_probs.topk(k, dim=1).indices
    one_hot = nn.functional.one_hot(labels, log_probs.shape[1]).to(probs.dtype)
    return {
        "cls/acc": (top_k[:, 0] == labels).float().mean().item(),
        "cls/acc5": (top_k == labels[:, None]).any(dim=1).float().mean().item(),
        "cls/nll": nn.functional.nll_loss(log_probs, labels).item(),
        "cal/brier": ((probs - one_hot) ** 2).sum(dim=1).mean().item(),
        "cal/ece": expected_calibration_error(probs, labels),
    }


@torch.no_grad()
def predict_log_probs(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    mc_samples: int = 0,
    average: str = "probs",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over ``loader`` in eval mode.

    With ``mc_samples > 0`` weight sampling is forced on and the predictive distribution is the
    mean of the per-sample softmaxes (``average="probs"``, in log space) or the softmax of the
    mean logits (``average="logits"``, 2DGBNN's rule).
    """
    device = torch.device(device)
    model.eval()
    outputs, targets = [], []
    with sampling(model, enabled=mc_samples > 0):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if mc_samples > 0 and average == "logits":
                logits = torch.stack([model(images).float() for _ in range(mc_samples)])
                outputs.append(logits.mean(0).log_softmax(1))
            elif mc_samples > 0:
                draws = torch.stack(
                    [model(images).float().log_softmax(1) for _ in range(mc_samples)]
                )
                outputs.append(torch.logsumexp(draws, 0) - math.log(mc_samples))
            else:
                outputs.append(model(images).float().log_softmax(1))
            targets.append(labels.to(device))
    return torch.cat(outputs), torch.cat(targets)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    mc_samples: int = 0,
    average: str = "probs",
) -> dict[str, float]:
    """Classification and calibration metrics of ``model`` on ``loader``."""
    return classification_metrics(*predict_log_probs(model, loader, device, mc_samples, average))


def _entropy_bits_from_counts(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def entropy_bits(values: torch.Tensor) -> float:
    """Shannon entropy, in bits, of the empirical distribution of ``values``."""
    return _entropy_bits_from_counts(torch.unique(values, return_counts=True)[1])


@torch.no_grad()
def converted_values(model: nn.Module) -> torch.Tensor:
    """All converted means (conv/linear weights and biases) as one flat tensor."""
    params = bayesian_params(model)
    if not params:
        raise ValueError("model has no converted conv/linear parameters; call to_bayesian first")
    return torch.cat([p.mu.detach().flatten() for p in params])


@torch.no_grad()
def weight_sharing_metrics(model: nn.Module) -> dict[str, float]:
    """Whole-network weight-sharing statistics over the converted parameters.

    Keys: ``ws/unique_values`` (among all converted values, free ones included),
    ``ws/unique_fixed_values`` (among the fixed ones only: the codebook so far),
    ``ws/entropy_bits``, ``ws/fixed_fraction``, ``ws/params_converted``,
    ``ws/params_other`` (norms, tokens, float layers: not counted as shared) and
    ``ws/params_excluded`` (those of them in conv/linear layers kept in float).
    """
    values = converted_values(model)
    counts = torch.unique(values, return_counts=True)[1]
    fixed_mask = torch.cat([p.fixed_mask.flatten() for p in bayesian_params(model)])
    fixed = int(fixed_mask.sum())
    # A unique over millions of values costs a second on a CPU; all or none fixed needs none.
    if fixed == values.numel():
        unique_fixed = len(counts)
    elif fixed == 0:
        unique_fixed = 0
    else:
        unique_fixed = torch.unique(values[fixed_mask]).numel()
    report = conversion_report(model)
    return {
        "ws/unique_values": float(len(counts)),
        "ws/unique_fixed_values": float(unique_fixed),
        "ws/entropy_bits": _entropy_bits_from_counts(counts),
        "ws/fixed_fraction": fixed / values.numel(),
        "ws/params_converted": float(report.num_converted),
        "ws/params_other": float(report.num_left),
        "ws/params_excluded": float(report.num_excluded),
    }
