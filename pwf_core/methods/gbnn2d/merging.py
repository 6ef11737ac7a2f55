"""Merging neighbouring Gaussians between VI epochs (the paper's Wasserstein-2 rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pwf_core.methods.gbnn2d.gaussians import (
    covariance_of,
    fitted_gaussians,
    parameters_from_covariance,
    w2_squared,
)
from pwf_core.methods.gbnn2d.sharing import SharedGaussians


@dataclass(frozen=True)
class MergeRule:
    """When two neighbouring Gaussians merge (all must hold).

    Args:
        tau_d: Largest squared Wasserstein-2 distance.
        tau_g: Largest mean member gradient ``|dL/dw|`` over the epoch, for both.
        tau_v: Largest variance of the members' means, for both.
        neighbours: Nearest Gaussians (by mean) each one is compared with.
    """

    tau_d: float
    tau_g: float
    tau_v: float
    neighbours: int = 3


@torch.no_grad()
def merge(sharing: SharedGaussians, points: torch.Tensor, rule: MergeRule) -> int:
    """Merge neighbouring Gaussians that satisfy ``rule``; members follow. Returns merges.

    Pairs are formed by mutual best partner (the smallest W2 among each one's neighbours),
    so each Gaussian takes part in at most one merge per call; the merged mean and
    covariance are the member-count-weighted averages of the two, and its prior is the
    Gaussian fitted to the merged members.
    """
    if sharing.num_gaussians < 2:
        return 0
    covariance = covariance_of(sharing.factors())
    into, gone = _mutual_pairs(sharing, points, covariance, rule)
    if len(into) == 0:
        sharing.reset_gradients()
        return 0
    members = sharing.member_counts().to(points.dtype)
    weight_into = members[into] / (members[into] + members[gone]).clamp_min(1)
    survivors, compact = _relabel(sharing, into, gone)
    _merge_posteriors(sharing, covariance, into, gone, weight_into, survivors)
    _refit_priors(sharing, points, survivors, compact[into])
    sharing.grad_sum = torch.zeros(int(survivors.sum()), device=sharing.means.device)
    sharing.reset_gradients()
    return len(into)


def _mutual_pairs(
    sharing: SharedGaussians, points: torch.Tensor, covariance: torch.Tensor, rule: MergeRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs ``(into[i], gone[i])`` that are each other's best allowed neighbour."""
    count = sharing.num_gaussians
    variance = sharing.member_variance(points)
    gradient = sharing.grad_sum / max(sharing.grad_steps, 1)
    neighbours = min(rule.neighbours, count - 1)
    distance = torch.cdist(sharing.means, sharing.means)
    distance.fill_diagonal_(torch.inf)
    partner = distance.topk(neighbours, largest=False).indices  # (K, n)
    first = torch.arange(count, device=partner.device).repeat_interleave(neighbours)
    second = partner.flatten()
    w2 = w2_squared(
        sharing.means[first], covariance[first], sharing.means[second], covariance[second]
    )
    allowed = (
        (w2 < rule.tau_d)
        & (gradient[first] < rule.tau_g)
        & (gradient[second] < rule.tau_g)
        & (variance[first] < rule.tau_v)
        & (variance[second] < rule.tau_v)
    )
    w2 = torch.where(allowed, w2, torch.inf)
    best_w2 = torch.full((count,), torch.inf, dtype=w2.dtype, device=w2.device)
    best_w2.scatter_reduce_(0, first, w2, reduce="amin")
    is_best = (w2 == best_w2[first]) & torch.isfinite(w2)
    best = torch.full((count,), -1, dtype=torch.long, device=w2.device)
    best[first[is_best]] = second[is_best]
    index = torch.arange(count, device=w2.device)
    mutual = (best >= 0) & (best[best.clamp_min(0)] == index)
    into = (mutual & (index < best)).nonzero().squeeze(1)
    return into, best[into]


def _relabel(
    sharing: SharedGaussians, into: torch.Tensor, gone: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point the members and blends of each ``gone`` Gaussian at its ``into`` partner, in the
    compacted numbering of the survivors. Returns the survivors' mask and that numbering."""
    count = sharing.num_gaussians
    survivors = torch.ones(count, dtype=torch.bool, device=into.device)
    survivors[gone] = False
    relabel = torch.arange(count, device=into.device)
    relabel[gone] = into
    compact = torch.cumsum(survivors, 0) - 1
    member = sharing.member.clone()
    inliers = member >= 0
    member[inliers] = compact[relabel[member[inliers]]]
    sharing.member = member
    sharing.blend_pair = compact[relabel[sharing.blend_pair]]
    return survivors, compact


def _merge_posteriors(
    sharing: SharedGaussians,
    covariance: torch.Tensor,
    into: torch.Tensor,
    gone: torch.Tensor,
    weight_into: torch.Tensor,
    survivors: torch.Tensor,
) -> None:
    """The merged Gaussians' means and covariances: member-weighted averages of the pair's."""

    def average(values: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (values.dim() - 1)
        return weight_into.view(shape) * values[into] + (1 - weight_into).view(shape) * values[gone]

    means = sharing.means.detach().clone()
    means[into] = average(means)
    log_diag, offdiag = sharing.log_diag.detach().clone(), sharing.offdiag.detach().clone()
    log_diag[into], offdiag[into] = parameters_from_covariance(average(covariance))
    sharing.means = nn.Parameter(means[survivors])
    sharing.log_diag = nn.Parameter(log_diag[survivors])
    sharing.offdiag = nn.Parameter(offdiag[survivors])


def _refit_priors(
    sharing: SharedGaussians, points: torch.Tensor, survivors: torch.Tensor, merged: torch.Tensor
) -> None:
    """A merged Gaussian's prior is the Gaussian fitted to its merged members."""
    inliers = sharing.member >= 0
    fitted_means, fitted_cov = fitted_gaussians(
        points[inliers], sharing.member[inliers], int(survivors.sum())
    )
    prior_means = sharing.prior_means[survivors].clone()
    prior_log_diag = sharing.prior_log_diag[survivors].clone()
    prior_offdiag = sharing.prior_offdiag[survivors].clone()
    prior_means[merged] = fitted_means[merged]
    prior_log_diag[merged], prior_offdiag[merged] = parameters_from_covariance(fitted_cov[merged])
    sharing.prior_means, sharing.prior_log_diag = prior_means, prior_log_diag
    sharing.prior_offdiag = prior_offdiag
