"""The 2DGBNN representation of a network's conv/linear weights: few shared 2-D Gaussians.

:class:`SharedGaussians` is a module installed on the model (as ``model._pwf_sharing``). Every
converted weight entry is, by position in the network's flat weight vector, either

- a **member** of Gaussian ``k``: its value is the first coordinate of Gaussian ``k``'s sample;
- **blended**: ``alpha`` times its first Gaussian's value plus ``1 - alpha`` times its second's;
- an **outlier**: its own 1-D Gaussian ``N(mu_i, sigma_i^2)``.

A forward pass with sampling on draws one 2-D sample per Gaussian (``m_k + L_k z_k``) and one
value per outlier, then builds the whole flat weight vector with a gather and two
``index_put`` calls (never a loop over Gaussians or weights) and hands each layer its slice.
With sampling off every weight is its mean. Biases and norm layers stay deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pwf_core.bayes import bayesian_params
from pwf_core.methods.gbnn2d.gaussians import (
    CHI2_95_2D,
    CHUNK,
    cholesky_from,
    covariance_of,
    fitted_gaussians,
    kl_2d,
    kl_normal,
    log_density,
    mahalanobis_squared,
    parameters_from_covariance,
    w2_squared,
)

ATTRIBUTE = "_pwf_sharing"
BLEND_CANDIDATES = 8  # Gaussians on each side (by mean mu) considered for a blended point


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


class SharedGaussians(nn.Module):
    """Shared 2-D Gaussians over (mu, sigma), outliers and blends for ``num_weights`` entries.

    Args:
        num_gaussians: ``K``.
        num_outliers: Entries that keep their own Gaussian.
        num_blended: Entries blended between two Gaussians.
        num_weights: All converted weight entries of the network.
    """

    def __init__(
        self, num_gaussians: int, num_outliers: int, num_blended: int, num_weights: int
    ) -> None:
        super().__init__()
        k, o, b = num_gaussians, num_outliers, num_blended
        self.means = nn.Parameter(torch.zeros(k, 2))
        self.log_diag = nn.Parameter(torch.zeros(k, 2))
        self.offdiag = nn.Parameter(torch.zeros(k))
        self.outlier_mu = nn.Parameter(torch.zeros(o))
        self.outlier_log_sigma = nn.Parameter(torch.zeros(o))
        for name, shape in (("means", (k, 2)), ("log_diag", (k, 2)), ("offdiag", (k,))):
            self.register_buffer(f"prior_{name}", torch.zeros(shape))
        self.register_buffer("prior_outlier_mu", torch.zeros(o))
        self.register_buffer("prior_outlier_log_sigma", torch.zeros(o))
        self.register_buffer("member", torch.zeros(num_weights, dtype=torch.long))
        self.register_buffer("outlier_index", torch.zeros(o, dtype=torch.long))
        self.register_buffer("blend_index", torch.zeros(b, dtype=torch.long))
        self.register_buffer("blend_pair", torch.zeros(b, 2, dtype=torch.long))
        self.register_buffer("blend_alpha", torch.zeros(b))
        # Mean |dL/dm_k0| per member over the current epoch (for merging), not saved.
        self.register_buffer("grad_sum", torch.zeros(k), persistent=False)
        self.grad_steps = 0
        self.__dict__["_pwf_sampling"] = None

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> SharedGaussians:
        """An empty container shaped to load ``tensors`` (a checkpoint or export)."""
        return cls(
            num_gaussians=len(tensors[f"{prefix}means"]),
            num_outliers=len(tensors[f"{prefix}outlier_mu"]),
            num_blended=len(tensors[f"{prefix}blend_index"]),
            num_weights=len(tensors[f"{prefix}member"]),
        )

    @property
    def num_gaussians(self) -> int:
        return len(self.means)

    @property
    def num_outliers(self) -> int:
        return len(self.outlier_mu)

    @property
    def num_blended(self) -> int:
        return len(self.blend_index)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The identity: installed on a model, the container is one of its children, and an
        ``nn.Sequential`` calls every child in turn; the weights come from the model's hook."""
        return inputs

    def factors(self) -> torch.Tensor:
        return cholesky_from(self.log_diag, self.offdiag)

    def fitted_factors(self) -> torch.Tensor:
        """Cholesky factors of the Gaussians fitted to the members (the priors)."""
        return cholesky_from(self.prior_log_diag, self.prior_offdiag)

    def sampling_on(self) -> bool:
        forced = self.__dict__["_pwf_sampling"]
        return self.training if forced is None else forced

    def flat_weights(self, sample: bool) -> torch.Tensor:
        """Every converted weight entry, in the network's flat order (differentiable)."""
        if sample:
            z = torch.randn_like(self.means)  # one 2-D sample per Gaussian
            first = self.means[:, 0] + self.log_diag[:, 0].exp() * z[:, 0]
            noise = torch.randn_like(self.outlier_mu)
            outliers = self.outlier_mu + self.outlier_log_sigma.exp() * noise
        else:
            first, outliers = self.means[:, 0], self.outlier_mu
        weights = first.index_select(0, self.member.clamp_min(0))
        if self.num_blended:
            alpha = self.blend_alpha
            blended = (
                alpha * first[self.blend_pair[:, 0]] + (1 - alpha) * first[self.blend_pair[:, 1]]
            )
            weights = weights.index_put((self.blend_index,), blended)
        if self.num_outliers:
            weights = weights.index_put((self.outlier_index,), outliers)
        return weights

    def kl(self) -> torch.Tensor:
        """``KL(q || prior)``: the Gaussians' (2-D, closed form) plus the outliers' (1-D)."""
        gaussians = kl_2d(
            self.means,
            self.log_diag,
            self.offdiag,
            self.prior_means,
            self.prior_log_diag,
            self.prior_offdiag,
        )
        if not self.num_outliers:
            return gaussians
        return gaussians + kl_normal(
            self.outlier_mu,
            self.outlier_log_sigma.exp(),
            self.prior_outlier_mu,
            self.prior_outlier_log_sigma.exp(),
        )

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def member_counts(self) -> torch.Tensor:
        """Members per Gaussian (outliers excluded)."""
        return torch.bincount(self.member[self.member >= 0], minlength=self.num_gaussians)

    @torch.no_grad()
    def record_gradient(self) -> None:
        """Add this step's mean member gradient ``|dL/dm_k0| / n_k`` (after backward)."""
        if self.means.grad is None:
            return
        counts = self.__dict__.get("_counts")
        if counts is None or len(counts) != self.num_gaussians:
            counts = self.__dict__["_counts"] = self.member_counts().clamp_min(1)
        self.grad_sum += self.means.grad[:, 0].abs() / counts
        self.grad_steps += 1

    @torch.no_grad()
    def assign_blends(self, points: torch.Tensor) -> None:
        """Blend every member outside its Gaussian's 95 % ellipse between its two most likely
        Gaussians, with ``alpha = softmax(log densities)``.

        Ellipses and densities are those of the Gaussians fitted to the members (the priors).
        The candidates of a point are the ``2 * BLEND_CANDIDATES`` Gaussians nearest to it in
        mu, where the likely ones are (the means are spread along mu).
        """
        factors = self.fitted_factors()
        centres = self.prior_means
        members = (self.member >= 0).nonzero().squeeze(1)
        own = self.member[members]
        outside = []
        for start in range(0, len(members), CHUNK):
            chunk, labels = members[start : start + CHUNK], own[start : start + CHUNK]
            distance = mahalanobis_squared(points[chunk], centres[labels], factors[labels])
            outside.append(chunk[distance > CHI2_95_2D])
        index = torch.cat(outside) if outside else members[:0]
        order = torch.argsort(centres[:, 0])
        sorted_mu = centres[order, 0].contiguous()
        width = min(BLEND_CANDIDATES, self.num_gaussians)
        position = torch.searchsorted(sorted_mu, points[index, 0].contiguous())
        low = (position - width).clamp(0, max(self.num_gaussians - 2 * width, 0))
        candidates = order[
            (low[:, None] + torch.arange(2 * width, device=low.device)).clamp(
                max=self.num_gaussians - 1
            )
        ]
        densities = log_density(points[index][:, None, :], centres[candidates], factors[candidates])
        top, which = densities.topk(min(2, densities.shape[1]), dim=1)
        if top.shape[1] < 2:  # a single Gaussian: nothing to blend with
            index, top, which = index[:0], top[:0], which[:0]
        pair = candidates.gather(1, which)
        self.blend_index = index
        self.blend_pair = pair
        self.blend_alpha = torch.softmax(top, dim=1)[:, 0].contiguous()

    @torch.no_grad()
    def merge(self, points: torch.Tensor, rule: MergeRule) -> int:
        """Merge neighbouring Gaussians that satisfy ``rule``; members follow. Returns merges.

        Pairs are formed by mutual best partner (the smallest W2 among each one's neighbours),
        so each Gaussian takes part in at most one merge per call; the merged mean and
        covariance are the member-count-weighted averages of the two, and its prior is the
        Gaussian fitted to the merged members.
        """
        count = self.num_gaussians
        if count < 2:
            return 0
        factors = self.factors()
        covariance = covariance_of(factors)
        members = self.member_counts().to(points.dtype)
        variance = self.member_variance(points)
        gradient = self.grad_sum / max(self.grad_steps, 1)
        neighbours = min(rule.neighbours, count - 1)
        distance = torch.cdist(self.means, self.means)
        distance.fill_diagonal_(torch.inf)
        partner = distance.topk(neighbours, largest=False).indices  # (K, n)
        first = torch.arange(count, device=partner.device).repeat_interleave(neighbours)
        second = partner.flatten()
        w2 = w2_squared(
            self.means[first], covariance[first], self.means[second], covariance[second]
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
        mutual = (best >= 0) & (best[best.clamp_min(0)] == torch.arange(count, device=w2.device))
        keep_side = mutual & (torch.arange(count, device=w2.device) < best)
        into = keep_side.nonzero().squeeze(1)
        gone = best[into]
        if len(into) == 0:
            self.reset_gradients()
            return 0
        weight_into = members[into] / (members[into] + members[gone]).clamp_min(1)
        weight_gone = 1 - weight_into

        def average(values: torch.Tensor) -> torch.Tensor:
            shape = (-1,) + (1,) * (values.dim() - 1)
            return weight_into.view(shape) * values[into] + weight_gone.view(shape) * values[gone]

        means = self.means.detach().clone()
        means[into] = average(means)
        merged_cov = average(covariance)
        log_diag, offdiag = self.log_diag.detach().clone(), self.offdiag.detach().clone()
        log_diag[into], offdiag[into] = parameters_from_covariance(merged_cov)
        survivors = torch.ones(count, dtype=torch.bool, device=w2.device)
        survivors[gone] = False
        relabel = torch.arange(count, device=w2.device)
        relabel[gone] = into
        compact = torch.cumsum(survivors, 0) - 1
        member = self.member.clone()
        inliers = member >= 0
        member[inliers] = compact[relabel[member[inliers]]]
        self.member = member
        self.blend_pair = compact[relabel[self.blend_pair]]
        self.means = nn.Parameter(means[survivors])
        self.log_diag = nn.Parameter(log_diag[survivors])
        self.offdiag = nn.Parameter(offdiag[survivors])
        fitted_means, fitted_cov = fitted_gaussians(
            points[inliers], member[inliers], int(survivors.sum())
        )
        merged = compact[into]
        prior_means = self.prior_means[survivors].clone()
        prior_log_diag = self.prior_log_diag[survivors].clone()
        prior_offdiag = self.prior_offdiag[survivors].clone()
        prior_means[merged] = fitted_means[merged]
        prior_log_diag[merged], prior_offdiag[merged] = parameters_from_covariance(
            fitted_cov[merged]
        )
        self.prior_means, self.prior_log_diag = prior_means, prior_log_diag
        self.prior_offdiag = prior_offdiag
        self.grad_sum = torch.zeros(int(survivors.sum()), device=w2.device)
        self.reset_gradients()
        return len(into)

    def reset_gradients(self) -> None:
        self.grad_sum.zero_()
        self.grad_steps = 0
        self.__dict__.pop("_counts", None)

    @torch.no_grad()
    def member_variance(self, points: torch.Tensor) -> torch.Tensor:
        """Variance of the members' means (the first coordinate of their points), per Gaussian."""
        count = self.num_gaussians
        inliers = (self.member >= 0).nonzero().squeeze(1)
        labels = self.member[inliers]
        values = points[inliers, 0].double()
        n = torch.bincount(labels, minlength=count).double().clamp_min(1)
        total = torch.zeros(count, dtype=torch.float64, device=points.device)
        mean = total.index_add(0, labels, values) / n
        squares = total.index_add(0, labels, (values - mean[labels]) ** 2)
        return (squares / n).to(points.dtype)


@torch.no_grad()
def mixture_snapshot(model: nn.Module, max_points: int = 40_000, seed: int = 0) -> dict:
    """Points (a seeded subsample), their Gaussians (-1: outlier) and the Gaussians' means and
    covariances, for a scatter plot of the mixture."""
    sharing = sharing_of(model)
    points = weight_points(model)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(points), generator=generator)[:max_points].to(points.device)
    return {
        "points": points[chosen].cpu(),
        "labels": sharing.member[chosen].cpu(),
        "means": sharing.prior_means.cpu(),
        "covariances": covariance_of(sharing.fitted_factors()).cpu(),
    }


def sharing_of(model: nn.Module) -> SharedGaussians | None:
    """The model's shared Gaussians, if 2DGBNN installed them."""
    return model._modules.get(ATTRIBUTE)  # type: ignore[return-value]


def weight_points(model: nn.Module) -> torch.Tensor:
    """``(N, 2)`` points (mu, sigma) of every converted weight entry, in flat order."""
    params = bayesian_params(model)
    mu = torch.cat([p.mu.detach().flatten() for p in params])
    sigma = torch.cat([p.sigma.detach().flatten() for p in params]).clamp_min(0)
    return torch.stack([mu, sigma], dim=1).float()


def _provide_weights(model: nn.Module, args: tuple) -> None:
    sharing = model._modules[ATTRIBUTE]
    flat = sharing.flat_weights(sample=sharing.sampling_on())
    for param, piece in zip(
        bayesian_params(model), flat.split(model.__dict__["_pwf_sizes"]), strict=True
    ):
        param.module.__dict__["_pwf_samples"][param.attr] = piece.view_as(param.mu)


def _clear_weights(model: nn.Module, args: tuple, output: object) -> None:
    for param in bayesian_params(model):
        param.module.__dict__["_pwf_samples"].clear()


def install(model: nn.Module, sharing: SharedGaussians) -> None:
    """Make ``model``'s converted weights come from ``sharing`` (replacing any earlier one).

    The layers' own means and sigmas stay in place, frozen: they are the points the Gaussians
    were fitted to.
    """
    detach(model)
    params = bayesian_params(model)
    sizes = [p.mu.numel() for p in params]
    if sum(sizes) != len(sharing.member):
        raise ValueError(f"the Gaussians cover {len(sharing.member)} weights, not {sum(sizes)}")
    device = params[0].mu.device
    model.add_module(ATTRIBUTE, sharing.to(device))
    for param in params:
        param.module.__dict__["_pwf_external"] = True
        param.mu.requires_grad_(False)
        param.sigma.requires_grad_(False)
    model.__dict__["_pwf_sizes"] = sizes
    model.__dict__["_pwf_sharing_hooks"] = (
        model.register_forward_pre_hook(_provide_weights),
        model.register_forward_hook(_clear_weights),
    )
    model.__dict__.setdefault("_pwf_detach", []).append(detach)


@torch.no_grad()
def detach(model: nn.Module) -> None:
    """Remove the shared Gaussians; the layers keep the Gaussians' mean weights."""
    sharing = sharing_of(model)
    if sharing is None:
        return
    flat = sharing.flat_weights(sample=False)
    for param, piece in zip(
        bayesian_params(model), flat.split(model.__dict__["_pwf_sizes"]), strict=True
    ):
        param.mu.copy_(piece.view_as(param.mu))
        param.mu.requires_grad_(True)
        param.module.__dict__.pop("_pwf_external", None)
    for handle in model.__dict__.pop("_pwf_sharing_hooks"):
        handle.remove()
    del model._modules[ATTRIBUTE]
    model.__dict__.pop("_pwf_sizes", None)
    hooks = model.__dict__.get("_pwf_detach", [])
    if detach in hooks:
        hooks.remove(detach)
