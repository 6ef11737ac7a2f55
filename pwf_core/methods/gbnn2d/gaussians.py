"""Batched 2-D Gaussian algebra and k-means for 2DGBNN, in closed form (no eig, no loops).

A Gaussian ``k`` is a mean ``m_k`` (2,) and a lower Cholesky factor
``L_k = [[exp(a_k), 0], [c_k, exp(d_k)]]``: the log-diagonal parametrisation keeps every
factor valid (positive diagonal) whatever the optimiser does to ``a, c, d``.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
CHI2_95_2D = 5.991  # squared Mahalanobis radius of the 95 % ellipse of a 2-D Gaussian
CHUNK = 1 << 20
COVARIANCE_JITTER = 1e-6  # share of the points' per-axis variance added to every covariance


def cholesky_from(log_diag: torch.Tensor, offdiag: torch.Tensor) -> torch.Tensor:
    """``(K, 2, 2)`` lower factors from log-diagonals ``(K, 2)`` and off-diagonals ``(K,)``."""
    factor = torch.zeros(len(offdiag), 2, 2, dtype=offdiag.dtype, device=offdiag.device)
    factor[:, 0, 0] = log_diag[:, 0].exp()
    factor[:, 1, 1] = log_diag[:, 1].exp()
    factor[:, 1, 0] = offdiag
    return factor


def parameters_from_covariance(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_diag, offdiag)`` of the Cholesky factor of SPD ``covariance`` ``(K, 2, 2)``."""
    factor = torch.linalg.cholesky(covariance)
    log_diag = torch.stack([factor[:, 0, 0].log(), factor[:, 1, 1].log()], dim=1)
    return log_diag, factor[:, 1, 0].clone()


def covariance_of(factor: torch.Tensor) -> torch.Tensor:
    return factor @ factor.transpose(1, 2)


def w2_squared(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> torch.Tensor:
    """Squared Wasserstein-2 distance between 2-D Gaussians, batched.

    ``||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``; for 2x2 SPD ``M``,
    ``tr(M^1/2) = sqrt(tr M + 2 sqrt(det M))`` and ``tr(S_a^1/2 S_b S_a^1/2) = tr(S_a S_b)``,
    ``det = det S_a det S_b``.
    """
    cross = (cov_a @ cov_b).diagonal(dim1=-2, dim2=-1).sum(-1)
    root_det = (torch.linalg.det(cov_a) * torch.linalg.det(cov_b)).clamp_min(0).sqrt()
    root_trace = (cross + 2 * root_det).clamp_min(0).sqrt()
    traces = cov_a.diagonal(dim1=-2, dim2=-1).sum(-1) + cov_b.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((mean_a - mean_b) ** 2).sum(-1) + (traces - 2 * root_trace).clamp_min(0)


def _solve_lower(factor: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``L^-1 v`` for 2x2 lower ``L`` (broadcast over leading dimensions)."""
    first = vector[..., 0] / factor[..., 0, 0]
    second = (vector[..., 1] - factor[..., 1, 0] * first) / factor[..., 1, 1]
    return torch.stack([first, second], dim=-1)


def mahalanobis_squared(
    points: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """``(x - m)^T S^-1 (x - m)`` with ``S = L L^T``; ``mean``/``factor`` broadcast on points."""
    return (_solve_lower(factor, points - mean) ** 2).sum(-1)


def log_density(points: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    log_det_half = factor[..., 0, 0].log() + factor[..., 1, 1].log()
    return -0.5 * mahalanobis_squared(points, mean, factor) - LOG_2PI - log_det_half


def kl_2d(
    mean_q: torch.Tensor,
    log_diag_q: torch.Tensor,
    offdiag_q: torch.Tensor,
    mean_p: torch.Tensor,
    log_diag_p: torch.Tensor,
    offdiag_p: torch.Tensor,
) -> torch.Tensor:
    """``KL(q || p)`` between batched 2-D Gaussians in Cholesky form, summed.

    ``0.5 (||L_p^-1 L_q||_F^2 + ||L_p^-1 (m_q - m_p)||^2 - 2) + sum(log diag L_p - log diag L_q)``.
    """
    factor_q = cholesky_from(log_diag_q, offdiag_q)
    factor_p = cholesky_from(log_diag_p, offdiag_p)
    columns = _solve_lower(factor_p[:, None], factor_q.transpose(1, 2))  # (K, 2 columns, 2)
    trace = (columns**2).sum((1, 2))
    quadratic = (_solve_lower(factor_p, mean_q - mean_p) ** 2).sum(-1)
    log_det = (log_diag_p - log_diag_q).sum(-1)
    return (0.5 * (trace + quadratic - 2) + log_det).sum()


def kl_normal(
    mu_q: torch.Tensor, sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor | float
) -> torch.Tensor:
    """``KL(N(mu_q, s_q^2) || N(mu_p, s_p^2))`` summed over elements."""
    sigma_p = torch.as_tensor(sigma_p, dtype=sigma_q.dtype, device=sigma_q.device)
    ratio = (sigma_q / sigma_p) ** 2
    return 0.5 * (ratio + ((mu_q - mu_p) / sigma_p) ** 2 - 1 - ratio.log()).sum()


def fitted_gaussians(
    points: torch.Tensor, labels: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(K, 2)`` and unbiased covariance ``(K, 2, 2)`` of each label's points.

    A small diagonal jitter (:data:`COVARIANCE_JITTER` of the points' per-axis variance) keeps
    every covariance positive definite, also for members with identical sigmas.
    """
    n = torch.bincount(labels, minlength=count).to(torch.float64)
    values = points.double()
    sums = torch.zeros(count, 2, dtype=torch.float64, device=points.device)
    means = sums.index_add(0, labels, values) / n.clamp_min(1)[:, None]
    centred = values - means[labels]
    outer = centred[:, :, None] * centred[:, None, :]
    scatter = torch.zeros(count, 2, 2, dtype=torch.float64, device=points.device)
    scatter.index_add_(0, labels, outer)
    covariance = scatter / (n - 1).clamp_min(1)[:, None, None]
    spread = values.var(0).clamp_min(1e-20) if len(values) > 1 else values.new_ones(2)
    covariance += COVARIANCE_JITTER * torch.diag(spread)
    return means.float(), covariance.float()


def nearest_centres(
    points: torch.Tensor, centres: torch.Tensor, window: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest centre (Euclidean) of each 2-D point, in time linear in the points.

    Centres are sorted by their first coordinate; each point compares the ``2 * window``
    centres nearest to it on that axis. A centre outside that window is farther on the first
    axis alone than the window's edge, so whenever the best squared distance found is below
    the edge's, the answer is exact; the few points where it is not are compared with every
    centre.

    Returns:
        Index of the nearest centre and the squared distance, per point.
    """
    count = len(centres)
    order = torch.argsort(centres[:, 0])
    ordered = centres[order]
    first = ordered[:, 0].contiguous()
    width = min(window, count)
    offsets = torch.arange(-width, width, device=points.device)
    index = torch.empty(len(points), dtype=torch.long, device=points.device)
    best = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), CHUNK):
        chunk = points[start : start + CHUNK]
        position = torch.searchsorted(first, chunk[:, 0].contiguous())
        low = (position - width).clamp(0, max(count - 2 * width, 0))
        candidates = low[:, None] + offsets + width
        candidates.clamp_(0, count - 1)
        distance = ((chunk[:, None, :] - ordered[candidates]) ** 2).sum(-1)
        nearest, which = distance.min(1)
        chosen = candidates.gather(1, which[:, None]).squeeze(1)
        lower_edge = low - 1
        upper_edge = low + 2 * width
        gap_low = torch.where(
            lower_edge >= 0, chunk[:, 0] - first[lower_edge.clamp_min(0)], torch.inf
        )
        gap_high = torch.where(
            upper_edge < count, first[upper_edge.clamp_max(count - 1)] - chunk[:, 0], torch.inf
        )
        unsure = (torch.minimum(gap_low, gap_high) ** 2 < nearest).nonzero().squeeze(1)
        if len(unsure):
            full = ((chunk[unsure][:, None, :] - ordered[None]) ** 2).sum(-1)
            nearest[unsure], chosen[unsure] = full.min(1)
        index[start : start + CHUNK] = order[chosen]
        best[start : start + CHUNK] = nearest
    return index, best


def kmeans_2d(
    points: torch.Tensor,
    clusters: int,
    iterations: int = 30,
    tolerance: float = 1e-4,
    fit_samples: int = 1 << 20,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on 2-D points, memory linear in the points.

    The centres are fitted on a seeded sample of ``fit_samples`` points (all of them when
    fewer), then every point is assigned to its nearest centre. Centres start at the points of
    evenly spaced ranks along the first axis (the data are spread along it); an empty cluster
    keeps its centre. Stops when no more than a ``tolerance`` share of the points change
    cluster.

    Returns:
        ``(centres (K, 2), labels (N,))``.
    """
    clusters = min(clusters, len(points))
    sample = points
    if len(points) > fit_samples:
        generator = torch.Generator().manual_seed(seed)
        sample = points[torch.randperm(len(points), generator=generator)[:fit_samples]]
    ranks = torch.linspace(0, len(sample) - 1, clusters, device=points.device).round().long()
    centres = sample[torch.argsort(sample[:, 0])[ranks]].clone()
    labels = torch.full((len(sample),), -1, dtype=torch.long, device=points.device)
    for _ in range(iterations):
        new_labels, _ = nearest_centres(sample, centres)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        counts = torch.bincount(labels, minlength=clusters).to(points.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, sample)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if changed <= tolerance * len(sample):
            break
    if sample is not points:
        labels = nearest_centres(points, centres)[0]
    return centres, labels
