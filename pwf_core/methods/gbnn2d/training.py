"""The two trainings of 2DGBNN as training hooks: the mean-field BNN's ELBO, and VI over the
shared Gaussians. Each ELBO term is ``KL / N`` with ``N`` the whole training set."""

from __future__ import annotations

import torch
from torch import nn

from pwf_core.bayes import bayesian_params
from pwf_core.distributed import world_size
from pwf_core.methods.gbnn2d.config import TwoDGBNNConfig
from pwf_core.methods.gbnn2d.gaussians import kl_normal
from pwf_core.methods.gbnn2d.sharing import SharedGaussians
from pwf_core.train import TrainingHooks


def dataset_size(loader) -> int:
    """Examples in the whole training set behind ``loader`` (the KL's ``1 / N_train``).

    The whole set, however many data-parallel ranks share it: each rank's ELBO is its batch's
    mean NLL plus ``KL / N``, and DDP averages the ranks' gradients, so ``N`` must not be one
    rank's share (that would make the prior ``world_size`` times too strong). pwf's loaders
    know the size (``dataset_size``), a ``DataLoader`` has its ``dataset`` (whole, also under a
    ``DistributedSampler``); any other iterable is counted, and under DDP taken to be one
    rank's shard of the set.
    """
    size = getattr(loader, "dataset_size", None)
    if isinstance(size, int):
        return size
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return world_size() * sum(len(targets) for _, targets in loader)


class MeanFieldHooks(TrainingHooks):
    """The mean-field BNN's ELBO term and its projection, and (in the last BNN epoch) the
    accumulated gradient magnitudes that decide the gradient outliers.

    Args:
        prior_mu: The prior's means (the pretrained weights), flat.
        config: The method's knobs.
        num_train: Examples of the whole training set (the ``N`` of ``KL / N``).
        collect_gradients: Sum ``|dL/dmu|`` per weight over the epoch.
    """

    def __init__(
        self,
        prior_mu: torch.Tensor,
        config: TwoDGBNNConfig,
        num_train: int,
        collect_gradients: bool,
    ) -> None:
        self.prior_mu, self.config, self.num_train = prior_mu, config, num_train
        self.collect_gradients = collect_gradients
        self.grad_magnitude: torch.Tensor | None = None

    def extra_loss(self, model: nn.Module, task_loss: torch.Tensor) -> torch.Tensor | None:
        params = bayesian_params(model)
        if self.prior_mu.device != params[0].mu.device:  # moved once, not copied every step
            self.prior_mu = self.prior_mu.to(params[0].mu.device)
        priors = self.prior_mu.split([p.mu.numel() for p in params])
        kl = sum(
            kl_normal(
                p.mu,
                p.sigma.clamp_min(self.config.sigma_min),
                prior.view_as(p.mu),
                self.config.prior_sigma,
            )
            for p, prior in zip(params, priors, strict=True)
        )
        return self.config.kl_weight * kl / self.num_train

    def after_backward(self, model: nn.Module) -> None:
        if not self.collect_gradients:
            return
        grads = [
            p.mu.grad.detach().abs().flatten()
            if p.mu.grad is not None
            else p.mu.new_zeros(p.mu.numel())
            for p in bayesian_params(model)
        ]
        step = torch.cat(grads)
        self.grad_magnitude = step if self.grad_magnitude is None else self.grad_magnitude + step

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for param in bayesian_params(model):
            param.sigma.clamp_(min=self.config.sigma_min)


class SharedGaussianHooks(TrainingHooks):
    """VI over the shared Gaussians: their KL to the priors, and the member gradients that
    decide which may merge."""

    def __init__(self, sharing: SharedGaussians, config: TwoDGBNNConfig, num_train: int) -> None:
        self.sharing, self.config, self.num_train = sharing, config, num_train

    def extra_loss(self, model: nn.Module, task_loss: torch.Tensor) -> torch.Tensor | None:
        return self.config.kl_weight * self.sharing.kl() / self.num_train

    def after_backward(self, model: nn.Module) -> None:
        self.sharing.record_gradient()
