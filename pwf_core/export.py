"""Compressed export: one global codebook, per-tensor index arrays, and everything else as is.

The file is a safetensors file holding ``codebook`` (float32), ``index.<param>`` (the smallest
integer dtype that fits the codebook) for every converted weight and bias, and ``param.<name>``
for the remaining state (norms, running statistics, tokens). Its JSON header carries the
architecture, the experiment config and the codebook, so :func:`load_compressed` rebuilds a
plain runnable ``nn.Module`` whose logits equal the fixed model's exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pwf_core.bayes import bayesian_params
from pwf_core.checkpoint import load_tensors, read_metadata, save_tensors
from pwf_core.metrics import converted_values
from pwf_core.models import ModelSpec

FORMAT_VERSION = 1
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
        entropy_bound_bytes: Lower bound with entropy-coded indices: ``N H / 8`` bytes for the
            converted weights plus the codebook and the other parameters as stored.
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


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the deterministic model: no sigmas, no fixed masks."""
    extra = {f"{p.name}_sigma" for p in bayesian_params(model)}
    extra |= {f"{p.name}_fixed_mask" for p in bayesian_params(model)}
    return {k: v for k, v in model.state_dict().items() if k not in extra}


@torch.no_grad()
def export_compressed(
    model: nn.Module,
    path: str | Path,
    spec: ModelSpec,
    config: dict[str, Any] | None = None,
    require_fixed: bool = True,
) -> ExportReport:
    """Write ``model`` (converted, with its weights fixed) as codebook + indices.

    Args:
        model: A converted model whose conv/linear weights hold codebook values.
        path: Output ``.safetensors`` file (written atomically).
        spec: The architecture, to rebuild the model on load.
        config: The experiment config (plain data) to record in the header.
        require_fixed: Refuse a model with free weights (their values would all be distinct).

    Raises:
        ValueError: when ``require_fixed`` and some converted weight is still free.
    """
    params = bayesian_params(model)
    if require_fixed and not all(bool(p.fixed_mask.all()) for p in params):
        raise ValueError("every converted weight must be fixed before export (run the schedule)")
    values = converted_values(model).cpu()
    codebook, counts = torch.unique(values, return_counts=True)
    dtype = index_dtype(len(codebook))
    tensors: dict[str, torch.Tensor] = {"codebook": codebook.float()}
    converted_names = {p.name for p in params}
    for param in params:
        index = torch.searchsorted(codebook, param.mu.detach().cpu().float().contiguous())
        tensors[f"index.{param.name}"] = index.to(dtype)
    plain = _plain_state(model)
    others = {name: t for name, t in plain.items() if name not in converted_names}
    tensors.update({f"param.{name}": t for name, t in others.items()})
    header = {
        "format_version": FORMAT_VERSION,
        "model": spec.to_dict(),
        "config": config or {},
        "codebook": codebook.tolist(),
    }
    path = save_tensors(path, tensors, {_METADATA_KEY: json.dumps(header)})
    p = counts.double() / counts.sum()
    entropy = float(-(p * torch.log2(p)).sum())
    other_bytes = sum(t.numel() * t.element_size() for t in others.values())
    float32_bytes = sum(t.numel() * t.element_size() for t in plain.values())
    return ExportReport(
        path=path,
        file_bytes=path.stat().st_size,
        float32_bytes=float32_bytes,
        entropy_bound_bytes=math.ceil(values.numel() * entropy / 8)
        + 4 * len(codebook)
        + other_bytes,
        unique_values=len(codebook),
        index_bits=torch.iinfo(dtype).bits,
    )


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of an exported model (architecture, config, codebook)."""
    metadata = read_metadata(path)
    if _METADATA_KEY not in metadata:
        raise ValueError(f"'{path}' is not a pwf compressed model (no '{_METADATA_KEY}' header)")
    return json.loads(metadata[_METADATA_KEY])


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild a plain, deterministic ``nn.Module`` (in eval mode) from an exported file."""
    header = read_header(path)
    tensors = load_tensors(path)
    codebook = tensors["codebook"]
    state = {
        name.removeprefix("param."): t for name, t in tensors.items() if name.startswith("param.")
    }
    for name, index in tensors.items():
        if name.startswith("index."):
            state[name.removeprefix("index.")] = codebook[index.long()]
    model = ModelSpec(**header["model"]).build()
    model.load_state_dict(state)
    return model.eval()
