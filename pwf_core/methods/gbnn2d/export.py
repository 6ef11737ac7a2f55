"""2DGBNN's compressed file format, ``gaussians``: the stochastic model as its shared Gaussians.

Tensors: ``means`` (K, 2), ``log_diag`` (K, 2), ``offdiag`` (K,) of the Gaussians;
``member`` (one index per converted weight entry, the smallest integer dtype that holds
``K + 1`` values, ``K`` marking an outlier); ``blend_index`` (int32), ``blend_pair`` (the
members' dtype) and ``blend_alpha``; ``outlier_index`` (int32), ``outlier_mu``,
``outlier_log_sigma``; the generic exporter adds ``param.<name>`` for everything else (biases,
norms). Priors are training state, not stored. The loaded model samples in train mode (or
under :func:`pwf_core.bayes.sampling`), its mean otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pwf_core._files import smallest_index_dtype
from pwf_core.bayes import bayesian_params, plain_state, to_bayesian
from pwf_core.export import Encoded
from pwf_core.methods.gbnn2d.network import install, sharing_of
from pwf_core.methods.gbnn2d.sharing import SharedGaussians
from pwf_core.registry import register_format

_PARAMETERS = ("means", "log_diag", "offdiag", "outlier_mu", "outlier_log_sigma")


def gaussian_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the compressed file stores for the shared weights (without other parameters)."""
    sharing = sharing_of(model)
    assert sharing is not None, "the model has no shared Gaussians"
    member = sharing.member.detach().cpu().clone()
    member[member < 0] = sharing.num_gaussians
    tensors = {name: getattr(sharing, name).detach().cpu() for name in _PARAMETERS}
    tensors |= {
        "member": member.to(smallest_index_dtype(sharing.num_gaussians + 1)),
        "blend_index": sharing.blend_index.cpu().to(torch.int32),
        "blend_pair": sharing.blend_pair.cpu().to(smallest_index_dtype(sharing.num_gaussians)),
        "blend_alpha": sharing.blend_alpha.cpu(),
        "outlier_index": sharing.outlier_index.cpu().to(torch.int32),
    }
    return tensors


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the stored tensors: the shared weights plus every other parameter and buffer."""
    converted = {p.name for p in bayesian_params(model)}
    others = [t for name, t in plain_state(model).items() if name not in converted]
    tensors = [*gaussian_tensors(model).values(), *others]
    return sum(t.numel() * t.element_size() for t in tensors)


@register_format("gaussians")
class GaussianFormat:
    """The shared Gaussians, one member index per weight, blends and outliers."""

    @staticmethod
    def claims(model: nn.Module) -> bool:
        return sharing_of(model) is not None

    @staticmethod
    def encode(model: nn.Module) -> Encoded:
        tensors = gaussian_tensors(model)
        layout = [[p.name, list(p.mu.shape)] for p in bayesian_params(model)]
        return Encoded(
            tensors,
            unique_values=len(tensors["means"]) + len(tensors["outlier_mu"]),
            index_bits=torch.iinfo(tensors["member"].dtype).bits,
            bound_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            header={"layout": layout},
        )

    @staticmethod
    def mean_weights(model: nn.Module) -> dict[str, torch.Tensor]:
        """The mean model's weights (Gaussians' means, blends, outliers), by parameter name."""
        sharing = sharing_of(model)
        assert sharing is not None, "the model has no shared Gaussians"
        params = bayesian_params(model)
        flat = sharing.flat_weights(sample=False).detach()
        pieces = flat.split([p.mu.numel() for p in params])
        return {p.name: piece.view_as(p.mu) for p, piece in zip(params, pieces, strict=True)}

    @staticmethod
    def decode(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Placeholders for the converted weights: the Gaussians provide them once installed."""
        return {name: torch.zeros(shape) for name, shape in header["layout"]}

    @staticmethod
    def install(model: nn.Module, tensors: dict[str, torch.Tensor], header: dict) -> None:
        """Install the stored Gaussians on the plain ``model`` (loaded with the other state)."""
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
