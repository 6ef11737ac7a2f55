"""Shared Gaussians installed on a network: its converted layers take their weights from them.

The container becomes a child module of the network (``model._pwf_sharing``, so that
``state_dict``, ``.to(device)`` and checkpoints carry it); a forward pre-hook on the network
builds the flat weight vector once per forward pass and hands each layer its slice.
"""

from __future__ import annotations

import torch
from torch import nn

from pwf_core.bayes import bayesian_params
from pwf_core.methods.gbnn2d.gaussians import covariance_of
from pwf_core.methods.gbnn2d.sharing import SharedGaussians

ATTRIBUTE = "_pwf_sharing"


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
