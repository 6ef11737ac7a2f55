"""The 2DGBNN representation of a network's conv/linear weights: few shared 2-D Gaussians.

:class:`SharedGaussians` is a module installed on the model (:mod:`.network`). Every
converted weight entry is, by position in the network's flat weight vector, either

- a **member** of Gaussian ``k``: its value is the first coordinate of Gaussian ``k``'s sample;
- **blended**: ``alpha`` times its first Gaussian's value plus ``1 - alpha`` times its second's;
- an **outlier**: its own 1-D Gaussian ``N(mu_i, sigma_i^2)``.

A forward pass with sampling on draws one 2-D sample per Gaussian (``m_k + L_k z_k``) and one
value per outlier, then builds the whole flat weight vector with a gather and two
``index_put`` calls (never a loop over Gaussians or weights) and hands each layer its slice.
With sampling off every weight is its mean. Biases and norm layers stay deterministic.
Blends are assigned in :mod:`.blending`, Gaussians merged in :mod:`.merging`.
"""

from __future__ import annotations

import torch
from torch import nn

from pwf_core.methods.gbnn2d.gaussians import (
    cholesky_from,
    kl_2d,
    kl_normal,
)


def _num_weights(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """Weights the Gaussians cover: one member index each, stored as is (a checkpoint) or
    entropy-coded with their counts (a compressed file)."""
    if f"{prefix}member" in tensors:
        return len(tensors[f"{prefix}member"])
    return int(tensors[f"{prefix}member_counts"].sum())


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
            num_weights=_num_weights(tensors, prefix),
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
        # A fixed-size sum, not bincount over the inliers: neither depends on the data's values
        # for its shape, so the count never waits for the device.
        inlier = self.member >= 0
        counts = torch.zeros(self.num_gaussians, dtype=torch.long, device=self.member.device)
        return counts.index_add_(0, self.member.clamp_min(0), inlier.long())

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
