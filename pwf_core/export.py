"""Compressed export: a method's shared values and each weight's index, everything else as is.

A compressed model is one safetensors file: the tensors of its file format (the default,
``codebook``, defined here: one global codebook and an index array per converted weight and
bias; a method that stores its models its own way registers a format of its own, as 2DGBNN's
shared Gaussians do, see :func:`pwf_core.registry.register_format`), ``param.<name>`` for the
remaining state (norms, running statistics, tokens), and a JSON header: the format, the
architecture when it is a registered or timm one (so :func:`load_compressed` can rebuild it),
the class name otherwise (then the caller passes a fresh instance), and the experiment config.
Loading gives a plain ``nn.Module`` whose logits equal the compressed model's exactly (a
stochastic format's model samples in train mode, or under :func:`pwf_core.bayes.sampling`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pwf_core._files import load_tensors, read_metadata, save_tensors, smallest_index_dtype
from pwf_core.bayes import bayesian_params, is_bayesian, plain_state
from pwf_core.errors import CheckpointError, NotCompressedError
from pwf_core.metrics import converted_values
from pwf_core.models import ModelSpec
from pwf_core.registry import format_for, format_named, register_format

FORMAT_VERSION = 2
_METADATA_KEY = "pwf"
_OTHER = "param."


@dataclass(frozen=True)
class ExportReport:
    """Sizes of an exported model.

    Args:
        path: The written file.
        file_bytes: Its size on disk.
        float32_bytes: Size of the uncompressed state dict (float32 weights).
        entropy_bound_bytes: Lower bound with entropy-coded indices: ``N H / 8`` bytes (``H``
            in bits) for the converted weights, plus the codebook and the other parameters.
        unique_values: Codebook size.
        index_bits: Bits per stored index.
    """

    path: Path
    file_bytes: int
    float32_bytes: int
    entropy_bound_bytes: int
    unique_values: int
    index_bits: int

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / self.file_bytes

    def as_metrics(self) -> dict[str, float]:
        return {
            "size/file_bytes": float(self.file_bytes),
            "size/float32_bytes": float(self.float32_bytes),
            "size/entropy_bound_bytes": float(self.entropy_bound_bytes),
            "size/compression_ratio": self.compression_ratio,
        }


@dataclass(frozen=True)
class Encoded:
    """What a file format stores for a model's converted weights.

    Args:
        tensors: The format's tensors (any names but ``param.*``, which hold the other state).
        unique_values: Shared values (or Gaussians and outliers) behind the weights.
        index_bits: Bits of one stored index.
        bound_bytes: The fewest bytes the shared weights could take (the other state apart).
        header: What the format adds to the JSON header.
    """

    tensors: dict[str, torch.Tensor]
    unique_values: int
    index_bits: int
    bound_bytes: int
    header: dict[str, Any] = field(default_factory=dict)


def index_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype (safetensors supports) that indexes ``codebook_size`` values."""
    return smallest_index_dtype(codebook_size)


def entropy_bound_bytes(counts: torch.Tensor, other_bytes: int) -> int:
    """``ceil(N H / 8)`` with ``H`` the entropy in bits of the index distribution ``counts``,
    plus 4 bytes per codebook entry and ``other_bytes``."""
    p = counts.double() / counts.sum()
    bits = float(-(p * torch.log2(p)).sum())
    return math.ceil(int(counts.sum()) * bits / 8) + 4 * len(counts) + other_bytes


@register_format("codebook")
class CodebookFormat:
    """One global codebook (float32) and, per converted tensor, ``index.<param>`` into it."""

    @staticmethod
    def claims(model: nn.Module) -> bool:
        """Every converted value is fixed to a shared value."""
        params = bayesian_params(model)
        return bool(params) and all(bool(p.fixed_mask.all()) for p in params)

    @staticmethod
    def encode(model: nn.Module) -> Encoded:
        values = converted_values(model).cpu()
        codebook, counts = torch.unique(values, return_counts=True)
        dtype = index_dtype(len(codebook))
        tensors: dict[str, torch.Tensor] = {"codebook": codebook.float()}
        for param in bayesian_params(model):
            index = torch.searchsorted(codebook, param.mu.detach().cpu().float().contiguous())
            tensors[f"index.{param.name}"] = index.to(dtype)
        return Encoded(
            tensors,
            unique_values=len(codebook),
            index_bits=torch.iinfo(dtype).bits,
            bound_bytes=entropy_bound_bytes(counts, 0),
            header={"codebook": codebook.tolist()},
        )

    @staticmethod
    def mean_weights(model: nn.Module) -> dict[str, torch.Tensor]:
        """Each converted tensor's values (its shared values), by parameter name."""
        return {p.name: p.mu.detach() for p in bayesian_params(model)}

    @staticmethod
    def decode(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The converted weights, by parameter name."""
        codebook = tensors["codebook"]
        return {
            name.removeprefix("index."): codebook[index.long()]
            for name, index in tensors.items()
            if name.startswith("index.")
        }

    @staticmethod
    def install(model: nn.Module, tensors: dict[str, torch.Tensor], header: dict) -> None:
        """Nothing to add: the loaded weights are the shared values."""
        return None


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    config: dict[str, Any] | None = None,
) -> ExportReport:
    """Write a compressed ``model`` (every converted weight shared) in its method's format.

    Args:
        model: A model compressed by :func:`pwf_core.compress` (or the round driver).
        path: Output ``.safetensors`` file (written atomically).
        spec: The architecture, so that :func:`load_compressed` can rebuild it without an
            instance; leave it out for your own model class.
        config: Plain data to record in the header (e.g. the experiment config).

    Raises:
        ValueError: when the model was never converted or some converted weight is free.
    """
    if not bayesian_params(model):
        raise ValueError("the model has no converted weights: compress it first")
    try:
        fmt = format_for(model)
    except LookupError:
        raise ValueError(
            "every converted weight must be fixed before export (run every step)"
        ) from None
    encoded = fmt.encode(model)
    plain = plain_state(model)
    converted = {p.name for p in bayesian_params(model)}
    others = {name: t for name, t in plain.items() if name not in converted}
    header = {
        "format_version": FORMAT_VERSION,
        "format": fmt.name,
        "model": spec.to_dict() if spec is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config or {},
        **encoded.header,
    }
    tensors = encoded.tensors | {f"{_OTHER}{name}": t for name, t in others.items()}
    path = save_tensors(path, tensors, {_METADATA_KEY: json.dumps(header)})
    return ExportReport(
        path=path,
        file_bytes=path.stat().st_size,
        float32_bytes=_nbytes(plain),
        entropy_bound_bytes=encoded.bound_bytes + _nbytes(others),
        unique_values=encoded.unique_values,
        index_bits=encoded.index_bits,
    )


_SHARED = "_pwf_shared"


@torch.no_grad()
def shared_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The value every shared tensor takes at inference, by parameter name.

    For a converted model whose every converted weight is fixed (its shared values), a 2DGBNN
    model (its Gaussians' mean weights), or a plain model from :func:`load_compressed`.
    Layers the user kept in float are not among them.

    Raises:
        NotCompressedError: for a model that was never compressed, or has free weights.
    """
    if bayesian_params(model):
        try:
            return format_for(model).mean_weights(model)
        except LookupError:
            raise NotCompressedError(
                "some converted weights are still free: run every step of the method first"
            ) from None
    names = model.__dict__.get(_SHARED)
    if names is None:
        raise NotCompressedError(
            "the model is not compressed: pass the model compress() returned or "
            "load_compressed() loaded"
        )
    return {name: model.get_parameter(name).detach() for name in names}


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of an exported model (architecture, config, format)."""
    metadata = read_metadata(path)
    if _METADATA_KEY not in metadata:
        raise CheckpointError(
            f"'{path}' is not a pwf compressed model (no '{_METADATA_KEY}' header)"
        )
    header = json.loads(metadata[_METADATA_KEY])
    if "format" not in header:
        raise CheckpointError(f"'{path}' is a pwf checkpoint, not a compressed model")
    return header


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """A plain ``nn.Module`` (in eval mode) from an exported file.

    Args:
        path: A file written by :func:`save_compressed`.
        model: A fresh instance of the architecture to load into (needed for your own model
            classes); without it, a registered or timm architecture is rebuilt from the header.

    Raises:
        CheckpointError: when the file is unreadable, or names no architecture and no
            ``model`` is given, or does not fit ``model``.
    """
    header = read_header(path)
    try:
        fmt = format_named(header["format"])
    except KeyError as err:
        raise CheckpointError(f"'{path}': {err.args[0]}") from None
    tensors = load_tensors(path)
    own = {name: t for name, t in tensors.items() if not name.startswith(_OTHER)}
    state = {n.removeprefix(_OTHER): t for n, t in tensors.items() if n.startswith(_OTHER)}
    state |= fmt.decode(own, header)
    if model is None:
        if header.get("model") is None:
            raise CheckpointError(
                f"'{path}' was saved from your own class {header.get('model_class')}: pass a "
                "fresh instance, load_compressed(path, model=MyNet(...))"
            )
        model = ModelSpec(**header["model"]).build()
    if any(is_bayesian(m) for m in model.modules()):
        raise ValueError("load_compressed expects a plain model; strip() a converted one first")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"'{path}' does not fit the given model: {err}") from None
    fmt.install(model, own, header)
    if not bayesian_params(model):
        # which tensors are shared values, for export_onnx; a stochastic format's model
        # keeps its converted layers and says so itself.
        model.__dict__[_SHARED] = tuple(
            name for name in fmt.decode(own, header) if name in dict(model.named_parameters())
        )
    return model.eval()
