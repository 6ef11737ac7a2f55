"""A training step that never waits for the device: every step of PWFN and of both 2DGBNN
stages runs whole on the ``meta`` device, where any read of a value (``.item()``, ``bool()``,
``nonzero``, boolean indexing, a copy to the host) raises, as it would stall a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pwf_core.bayes import bayesian_params, set_sigma_regulariser, to_bayesian
from pwf_core.methods.gbnn2d import TwoDGBNNConfig
from pwf_core.methods.gbnn2d.method import TwoDGBNN
from pwf_core.methods.gbnn2d.network import sharing_of
from pwf_core.methods.gbnn2d.training import MeanFieldHooks, SharedGaussianHooks
from pwf_core.methods.pwfn.variance import DEFAULT_REG, init_sigma_
from pwf_core.models import build_model
from pwf_core.train import OptimConfig, TrainingHooks, _Step

ADAM = OptimConfig(optimizer="adamw", weight_decay=0.0, grad_clip=None)

MODELS = {  # name: (in_chans, img_size)
    "small_cnn": (1, 8),
    "resnet18": (3, 32),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    chans, size = MODELS[name]
    return build_model(name, num_classes=10, in_chans=chans, img_size=size)


def _pwfn(model: nn.Module) -> tuple[TrainingHooks, OptimConfig]:
    to_bayesian(model)
    init_sigma_(model)
    set_sigma_regulariser(model, DEFAULT_REG)
    for param in bayesian_params(model):  # a round in: some entries fixed
        param.fixed_mask.view(-1)[::3] = True
    return TrainingHooks(), OptimConfig()


def _meanfield(model: nn.Module) -> tuple[TrainingHooks, OptimConfig]:
    method = TwoDGBNN(TwoDGBNNConfig())
    method.convert(model)
    num_train = 1000
    return MeanFieldHooks(method.prior_mu, method.config, num_train, True), ADAM


def _shared(model: nn.Module) -> tuple[TrainingHooks, OptimConfig]:
    method = TwoDGBNN(TwoDGBNNConfig(gaussians=16, min_cluster_size=2))
    method.convert(model)
    sharing = method.build_mixture(model)
    sharing.reset_gradients()
    return SharedGaussianHooks(sharing, method.config, 1000), ADAM


STAGES = {"pwfn": _pwfn, "2dgbnn-meanfield": _meanfield, "2dgbnn-shared": _shared}


def _masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """What :func:`pwf_core.bayes.fixed_masks` gives (it reads ``any()``: set-up, not a step)."""
    return {
        tensor: param.fixed_mask
        for param in bayesian_params(model)
        for tensor in (param.mu, param.sigma)
        if param.fixed_mask.any()
    }


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_never_reads_a_value_back(name, stage):
    model = _model(name)
    hooks, optim = STAGES[stage](model)
    masks = _masks(model)
    model.to("meta").train()
    if isinstance(hooks, MeanFieldHooks):
        hooks.prior_mu = hooks.prior_mu.to("meta")
    step = _Step(model, optim, 10, True, masks, hooks)
    chans, size = MODELS[name]
    images = torch.randn(4, chans, size, size, device="meta")
    labels = torch.randint(0, 10, (4,), device="meta")
    for _ in range(2):  # the second step has optimiser state and accumulated statistics
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        extra = hooks.extra_loss(model, loss)
        step(loss if extra is None else loss + extra)
    assert logits.device.type == "meta"
    if stage == "2dgbnn-shared":
        assert sharing_of(model).grad_steps == 2
    if stage == "2dgbnn-meanfield":
        assert hooks.grad_magnitude is not None


def test_the_meta_device_catches_a_read():
    # The check is real: the sync the sampler used to have (bool(sigma.amin() < floor)) fails.
    sigma = torch.rand(4, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        bool(sigma.amin() < 2.0**-30)
