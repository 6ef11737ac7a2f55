"""The compressed stochastic model on disk: Gaussians, member indices, blends, outliers.

Tensors: ``means`` (K, 2), ``log_diag`` (K, 2), ``offdiag`` (K,) of the Gaussians;
``member`` (one index per converted weight entry, the smallest integer dtype that holds
``K + 1`` values, ``K`` marking an outlier); ``blend_index`` (int32), ``blend_pair`` (the
members' dtype) and ``blend_alpha``; ``outlier_index`` (int32), ``outlier_mu``,
``outlier_log_sigma``; and ``param.<name>`` for everything else (biases, norms). Priors are
training state, not stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.methods.gbnn2d.sharing import SharedGaussians, install, sharing_of

FORMAT = "gaussians"
_PARAMETERS = ("means", "log_diag", "offdiag", "outlier_mu", "outlier_log_sigma")


def _index_dtype(values: int) -> torch.dtype:
    if values <= 2**8:
        return torch.uint8
    if values <= 2**15:
        return torch.int16
    return torch.int32


def gaussian_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the compressed file stores for the shared weights (without other parameters)."""
    sharing = sharing_of(model)
    assert sharing is not None, "the model has no shared Gaussians"
    member = sharing.member.detach().cpu().clone()
    member[member < 0] = sharing.num_gaussians
    tensors = {name: getattr(sharing, name).detach().cpu() for name in _PARAMETERS}
    tensors |= {
        "member": member.to(_index_dtype(sharing.num_gaussians + 1)),
        "blend_index": sharing.blend_index.cpu().to(torch.int32),
        "blend_pair": sharing.blend_pair.cpu().to(_index_dtype(sharing.num_gaussians)),
        "blend_alpha": sharing.blend_alpha.cpu(),
        "outlier_index": sharing.outlier_index.cpu().to(torch.int32),
    }
    return tensors


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the stored tensors: the shared weights plus every other parameter and buffer."""
    from pwf_core.export import plain_state

    converted = {p.name for p in bayesian_params(model)}
    others = [t for name, t in plain_state(model).items() if name not in converted]
    tensors = [*gaussian_tensors(model).values(), *others]
    return sum(t.numel() * t.element_size() for t in tensors)


def restore_sharing(
    model: nn.Module, tensors: dict[str, torch.Tensor], header: dict[str, Any]
) -> nn.Module:
    """Install the stored Gaussians on a plain ``model`` (loaded with the other parameters)."""
    to_bayesian(model, attrs=("weight",))
    sharing = SharedGaussians.from_state(tensors)
    for name in _PARAMETERS:
        getattr(sharing, name).data.copy_(tensors[name])
        getattr(sharing, f"prior_{name}").copy_(tensors[name])
    member = tensors["member"].long()
    member[member == len(tensors["means"])] = -1
    sharing.member.copy_(member)
    sharing.blend_index = tensors["blend_index"].long()
    sharing.blend_pair = tensors["blend_pair"].long()
    sharing.blend_alpha = tensors["blend_alpha"].float()
    sharing.outlier_index.copy_(tensors["outlier_index"].long())
    for param in bayesian_params(model):
        param.sigma.data.zero_()
    install(model, sharing)
    return model
