"""2DGBNN's compressed file format, ``gaussians``: the stochastic model as its shared Gaussians.

Tensors: ``means`` (K, 2), ``log_diag`` (K, 2), ``offdiag`` (K,) of the Gaussians;
``member_counts`` (K + 1, int32) and ``member_coded`` (uint32 ANS words): every converted
weight entry's Gaussian, ``K`` marking an outlier, entropy-coded in the header's ``layout``
order (version 2 files stored ``member``, one fixed-length index per entry, and still load);
``blend_index`` (int32), ``blend_pair`` and ``blend_alpha``; ``outlier_index`` (int32),
``outlier_mu``, ``outlier_log_sigma``; the generic exporter adds ``param.<name>`` for
everything else (biases, norms). Priors are training state, not stored. The loaded model
samples in train mode (or under :func:`pwf_core.bayes.sampling`), its mean otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pwf_core import _entropy as entropy_coding
from pwf_core._entropy import entropy_bytes, symbol_counts
from pwf_core._files import smallest_index_dtype
from pwf_core.bayes import bayesian_params, plain_state, to_bayesian
from pwf_core.export import Encoded, layout_of
from pwf_core.methods.gbnn2d.network import install, sharing_of
from pwf_core.methods.gbnn2d.sharing import SharedGaussians
from pwf_core.registry import register_format

_PARAMETERS = ("means", "log_diag", "offdiag", "outlier_mu", "outlier_log_sigma")


def _members(sharing: SharedGaussians) -> torch.Tensor:
    """Each weight's Gaussian, ``K`` for an outlier."""
    member = sharing.member.detach().cpu().clone()
    member[member < 0] = sharing.num_gaussians
    return member


def gaussian_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the compressed file stores for the shared weights (without other parameters),
    with the members' indices at fixed length (``member``)."""
    sharing = sharing_of(model)
    assert sharing is not None, "the model has no shared Gaussians"
    tensors = {name: getattr(sharing, name).detach().cpu() for name in _PARAMETERS}
    tensors |= {
        "member": _members(sharing).to(smallest_index_dtype(sharing.num_gaussians + 1)),
        "blend_index": sharing.blend_index.cpu().to(torch.int32),
        "blend_pair": sharing.blend_pair.cpu().to(smallest_index_dtype(sharing.num_gaussians)),
        "blend_alpha": sharing.blend_alpha.cpu(),
        "outlier_index": sharing.outlier_index.cpu().to(torch.int32),
    }
    return tensors


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the stored tensors (the members' indices entropy-coded): the shared weights
    plus every other parameter and buffer."""
    converted = {p.name for p in bayesian_params(model)}
    others = {name: t for name, t in plain_state(model).items() if name not in converted}
    return _nbytes(GaussianFormat.encode(model).tensors) + _nbytes(others)


@register_format("gaussians")
class GaussianFormat:
    """The shared Gaussians, one member index per weight, blends and outliers."""

    @staticmethod
    def claims(model: nn.Module) -> bool:
        return sharing_of(model) is not None

    @staticmethod
    def encode(model: nn.Module) -> Encoded:
        tensors = gaussian_tensors(model)
        member = tensors.pop("member")
        counts = symbol_counts(member, len(tensors["means"]) + 1)
        coded, crc = entropy_coding.encode(member, counts)
        return Encoded(
            tensors | {"member_counts": counts.to(torch.int32), "member_coded": coded},
            shared_weights=len(member),
            unique_values=len(tensors["means"]) + len(tensors["outlier_mu"]),
            index_bits=torch.iinfo(member.dtype).bits,
            bound_bytes=entropy_bytes(counts) + _nbytes(tensors),
            fixed_length_bytes=member.numel() * member.element_size() + _nbytes(tensors),
            header={
                "layout": layout_of(model),
                "member_coding": entropy_coding.CODER,
                "member_crc32": crc,
            },
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
        names = {name for name, _ in header["layout"]}
        to_bayesian(model, attrs=("weight",), filter_fn=lambda _, name: f"{name}.weight" in names)
        sharing = SharedGaussians.from_state(tensors)
        for name in _PARAMETERS:
            getattr(sharing, name).data.copy_(tensors[name])
            getattr(sharing, f"prior_{name}").copy_(tensors[name])
        if "member" in tensors:
            member = tensors["member"].long()
        else:
            member = entropy_coding.decode(
                tensors["member_coded"], tensors["member_counts"].long(), header["member_crc32"]
            )
        member[member == len(tensors["means"])] = -1
        sharing.member.copy_(member)
        sharing.blend_index = tensors["blend_index"].long()
        sharing.blend_pair = tensors["blend_pair"].long()
        sharing.blend_alpha = tensors["blend_alpha"].float()
        sharing.outlier_index.copy_(tensors["outlier_index"].long())
        for param in bayesian_params(model):
            param.sigma.data.zero_()
        install(model, sharing)
