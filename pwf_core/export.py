"""Compressed export: one global codebook, per-tensor index arrays, and everything else as is.

The file is a safetensors file holding ``codebook`` (float32), ``index.<param>`` (the smallest
integer dtype that fits the codebook) for every converted weight and bias, and ``param.<name>``
for the remaining state (norms, running statistics, tokens). A 2DGBNN model is stored as its
shared Gaussians instead (:mod:`pwf_core.methods.gbnn2d.export`) and loads back as a
stochastic module: sampling on (train mode or :func:`pwf_core.bayes.sampling`) draws from it.
The JSON header records the architecture when it is a registered or timm one (so
:func:`load_compressed` can rebuild it), the class name otherwise (then the caller passes a
fresh instance), and the experiment config.
Loading gives a plain ``nn.Module`` whose logits equal the fixed model's exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pwf_core._files import CheckpointError, load_tensors, read_metadata, save_tensors
from pwf_core.bayes import bayesian_params, is_bayesian
from pwf_core.metrics import converted_values
from pwf_core.models import ModelSpec

FORMAT_VERSION = 2
_METADATA_KEY = "pwf"


def index_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype (safetensors supports) that indexes ``codebook_size`` values."""
    if codebook_size <= 2**8:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32


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


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the deterministic model: no sigmas, no fixed masks, no method state."""
    extra = set()
    for p in bayesian_params(model):
        extra |= {f"{p.name}_sigma", f"{p.name}_fixed_mask"}
    return {
        k: v for k, v in model.state_dict().items() if k not in extra and not k.startswith("_pwf")
    }


def entropy_bound_bytes(counts: torch.Tensor, other_bytes: int) -> int:
    """``ceil(N H / 8)`` with ``H`` the entropy in bits of the index distribution ``counts``,
    plus 4 bytes per codebook entry and ``other_bytes``."""
    p = counts.double() / counts.sum()
    bits = float(-(p * torch.log2(p)).sum())
    return math.ceil(int(counts.sum()) * bits / 8) + 4 * len(counts) + other_bytes


@torch.no_grad()
def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    config: dict[str, Any] | None = None,
) -> ExportReport:
    """Write a compressed (every converted weight fixed) ``model`` as codebook + indices.

    Args:
        model: A model compressed by :func:`pwf_core.compress` (or the round driver).
        path: Output ``.safetensors`` file (written atomically).
        spec: The architecture, so that :func:`load_compressed` can rebuild it without an
            instance; leave it out for your own model class.
        config: Plain data to record in the header (e.g. the experiment config).

    Raises:
        ValueError: when the model was never converted or some converted weight is free.
    """
    params = bayesian_params(model)
    if not params:
        raise ValueError("the model has no converted weights: compress it first")
    if model._modules.get("_pwf_sharing") is not None:
        return _save_gaussians(model, path, spec, config)
    if not all(bool(p.fixed_mask.all()) for p in params):
        raise ValueError("every converted weight must be fixed before export (run every step)")
    values = converted_values(model).cpu()
    codebook, counts = torch.unique(values, return_counts=True)
    dtype = index_dtype(len(codebook))
    tensors: dict[str, torch.Tensor] = {"codebook": codebook.float()}
    converted_names = {p.name for p in params}
    for param in params:
        index = torch.searchsorted(codebook, param.mu.detach().cpu().float().contiguous())
        tensors[f"index.{param.name}"] = index.to(dtype)
    plain = plain_state(model)
    others = {name: t for name, t in plain.items() if name not in converted_names}
    tensors.update({f"param.{name}": t for name, t in others.items()})
    header = {
        "format_version": FORMAT_VERSION,
        "format": "codebook",
        "model": spec.to_dict() if spec is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config or {},
        "codebook": codebook.tolist(),
    }
    path = save_tensors(path, tensors, {_METADATA_KEY: json.dumps(header)})
    other_bytes = sum(t.numel() * t.element_size() for t in others.values())
    return ExportReport(
        path=path,
        file_bytes=path.stat().st_size,
        float32_bytes=sum(t.numel() * t.element_size() for t in plain.values()),
        entropy_bound_bytes=entropy_bound_bytes(counts, other_bytes),
        unique_values=len(codebook),
        index_bits=torch.iinfo(dtype).bits,
    )


def _save_gaussians(
    model: nn.Module, path: str | Path, spec: ModelSpec | None, config: dict[str, Any] | None
) -> ExportReport:
    """2DGBNN's stochastic model: shared Gaussians, members, blends, outliers, the rest."""
    from pwf_core.methods.gbnn2d.export import FORMAT, gaussian_tensors

    params = bayesian_params(model)
    converted = {p.name for p in params}
    plain = plain_state(model)
    others = {name: t for name, t in plain.items() if name not in converted}
    tensors = gaussian_tensors(model) | {f"param.{name}": t for name, t in others.items()}
    header = {
        "format_version": FORMAT_VERSION,
        "format": FORMAT,
        "model": spec.to_dict() if spec is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config or {},
        "layout": [[p.name, list(p.mu.shape)] for p in params],
    }
    path = save_tensors(path, tensors, {_METADATA_KEY: json.dumps(header)})
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return ExportReport(
        path=path,
        file_bytes=path.stat().st_size,
        float32_bytes=sum(t.numel() * t.element_size() for t in plain.values()),
        entropy_bound_bytes=stored,
        unique_values=len(tensors["means"]) + len(tensors["outlier_mu"]),
        index_bits=torch.iinfo(tensors["member"].dtype).bits,
    )


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of an exported model (architecture, config, codebook)."""
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
    """A plain, deterministic ``nn.Module`` (in eval mode) from an exported file.

    Args:
        path: A file written by :func:`save_compressed`.
        model: A fresh instance of the architecture to load into (needed for your own model
            classes); without it, a registered or timm architecture is rebuilt from the header.

    Raises:
        CheckpointError: when the file is unreadable, or names no architecture and no
            ``model`` is given, or does not fit ``model``.
    """
    header = read_header(path)
    tensors = load_tensors(path)
    state = {
        name.removeprefix("param."): t for name, t in tensors.items() if name.startswith("param.")
    }
    if header["format"] == "codebook":
        codebook = tensors["codebook"]
        for name, index in tensors.items():
            if name.startswith("index."):
                state[name.removeprefix("index.")] = codebook[index.long()]
    else:  # shared Gaussians: weights are placeholders until the Gaussians are installed
        for name, shape in header["layout"]:
            state[name] = torch.zeros(shape)
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
    if header["format"] != "codebook":
        from pwf_core.methods.gbnn2d.export import restore_sharing

        restore_sharing(model, {k: v for k, v in tensors.items() if "." not in k}, header)
    return model.eval()
