"""Compressed export: a method's shared values and each weight's index, everything else as is.

A compressed model is one safetensors file: the tensors of its file format (the default,
``codebook``, defined here: one global codebook and every converted weight's and bias's index
into it, entropy-coded as one stream; a method that stores its models its own way registers a
format of its own, as 2DGBNN's shared Gaussians do, see
:func:`pwf_core.registry.register_format`), ``param.<name>`` for the remaining state (norms,
running statistics, layers kept in float), and a JSON header: the format and its version, the
layout of the coded tensors, the architecture when it is a registered or timm one (so
:func:`load_compressed` can rebuild it), the class name otherwise (then the caller passes a
fresh instance), the experiment config and a SHA-256 of the tensors. Loading gives a plain
``nn.Module`` whose logits equal the compressed model's exactly (a stochastic format's model
samples in train mode, or under :func:`pwf_core.bayes.sampling`); a truncated, corrupted or
newer file raises :class:`~pwf_core.errors.CompressedFileError` instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pwf_core import _entropy as entropy_coding
from pwf_core._entropy import entropy_bytes, symbol_counts
from pwf_core._files import (
    load_tensors,
    read_metadata,
    save_tensors,
    smallest_index_dtype,
    tensor_digest,
)
from pwf_core.bayes import bayesian_params, is_bayesian, plain_state
from pwf_core.data.contract import CONTRACT_KEY, InputContract
from pwf_core.errors import CheckpointError, CompressedFileError, NotCompressedError
from pwf_core.metrics import converted_values
from pwf_core.models import ModelSpec
from pwf_core.registry import format_for, format_named, register_format

FORMAT_VERSION = 3
#: Versions this pwf reads: 2 stored one fixed-length index per weight, 3 entropy-codes them.
_OLDEST_VERSION = 2
_METADATA_KEY = "pwf"
_OTHER = "param."


@dataclass(frozen=True)
class ExportReport:
    """Sizes of an exported model.

    Args:
        path: The written file.
        file_bytes: Its size on disk.
        float32_bytes: Size of the uncompressed state dict (float32 weights).
        fixed_length_bytes: Size of the same file with one fixed-length index (``index_bits``)
            per weight instead of the entropy-coded stream.
        entropy_bound_bytes: The fewest bytes the content can take: ``N H / 8`` (``H`` in
            bits, the entropy of the shared weights' indices) plus the shared values and the
            unshared tensors, without the header.
        header_bytes: The file's header (tensor table, architecture, config).
        shared_weights: ``N``, the weights whose indices are coded.
        unique_values: Codebook size (2DGBNN: Gaussians and outliers).
        index_bits: Bits of one fixed-length index.
    """

    path: Path
    file_bytes: int
    float32_bytes: int
    fixed_length_bytes: int
    entropy_bound_bytes: int
    header_bytes: int
    shared_weights: int
    unique_values: int
    index_bits: int

    @property
    def compression_ratio(self) -> float:
        """How many times smaller than the float32 state dict the file is."""
        return self.float32_bytes / self.file_bytes

    @property
    def bound_ratio(self) -> float:
        """The file against the entropy bound plus its header (1.0: nothing wasted)."""
        return self.file_bytes / (self.entropy_bound_bytes + self.header_bytes)

    def as_metrics(self) -> dict[str, float]:
        return {
            "size/file_bytes": float(self.file_bytes),
            "size/fixed_length_bytes": float(self.fixed_length_bytes),
            "size/entropy_bound_bytes": float(self.entropy_bound_bytes),
            "size/header_bytes": float(self.header_bytes),
            "size/float32_bytes": float(self.float32_bytes),
            "size/compression_ratio": self.compression_ratio,
            "size/fixed_length_ratio": self.float32_bytes / self.fixed_length_bytes,
            "size/bound_ratio": self.bound_ratio,
        }


@dataclass(frozen=True)
class Encoded:
    """What a file format stores for a model's converted weights.

    Args:
        tensors: The format's tensors (any names but ``param.*``, which hold the other state).
        shared_weights: Weights whose indices the format codes.
        unique_values: Shared values (or Gaussians and outliers) behind the weights.
        index_bits: Bits of one fixed-length index.
        bound_bytes: The fewest bytes the shared weights could take (the other state apart).
        fixed_length_bytes: What ``tensors`` would take with fixed-length indices.
        header: What the format adds to the JSON header.
    """

    tensors: dict[str, torch.Tensor]
    shared_weights: int
    unique_values: int
    index_bits: int
    bound_bytes: int
    fixed_length_bytes: int
    header: dict[str, Any] = field(default_factory=dict)


def index_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype (safetensors supports) that indexes ``codebook_size`` values."""
    return smallest_index_dtype(codebook_size)


def entropy_bound_bytes(counts: torch.Tensor, other_bytes: int) -> int:
    """``ceil(N H / 8)`` with ``H`` the entropy in bits of the index distribution ``counts``,
    plus 4 bytes per codebook entry and ``other_bytes``."""
    return entropy_bytes(counts) + 4 * len(counts) + other_bytes


def layout_of(model: nn.Module) -> list[list[Any]]:
    """``[name, shape]`` of every converted tensor, in the order their indices are coded."""
    return [[p.name, list(p.mu.shape)] for p in bayesian_params(model)]


def split_by_layout(flat: torch.Tensor, layout: list[list[Any]]) -> dict[str, torch.Tensor]:
    """``flat`` cut into the tensors of ``layout``.

    Raises:
        CompressedFileError: when ``flat`` does not hold exactly the layout's entries.
    """
    sizes = [math.prod(shape) for _, shape in layout]
    if sum(sizes) != len(flat):
        raise CompressedFileError(f"the indices hold {len(flat)} weights, the layout {sum(sizes)}")
    pieces = flat.split(sizes)
    return {name: piece.view(shape) for (name, shape), piece in zip(layout, pieces, strict=True)}


@register_format("codebook")
class CodebookFormat:
    """One global codebook (float32), the index counts and the entropy-coded index stream.

    Tensors: ``codebook`` (K,), ``index_counts`` (K, int32) and ``index_coded`` (uint32 ANS
    words of every converted entry's index, in the header's ``layout`` order). Version 2
    files stored ``index.<param>`` (one fixed-length index per entry) instead; they still load.
    """

    @staticmethod
    def claims(model: nn.Module) -> bool:
        """Every converted value is fixed to a shared value."""
        params = bayesian_params(model)
        return bool(params) and all(bool(p.fixed_mask.all()) for p in params)

    @staticmethod
    def encode(model: nn.Module) -> Encoded:
        values = converted_values(model).cpu().float()
        codebook = torch.unique(values)
        index = torch.searchsorted(codebook, values)
        counts = symbol_counts(index, len(codebook))
        coded, crc = entropy_coding.encode(index, counts)
        bits = torch.iinfo(index_dtype(len(codebook))).bits
        return Encoded(
            {"codebook": codebook, "index_counts": counts.to(torch.int32), "index_coded": coded},
            shared_weights=len(values),
            unique_values=len(codebook),
            index_bits=bits,
            bound_bytes=entropy_bound_bytes(counts, 0),
            fixed_length_bytes=4 * len(codebook) + len(values) * bits // 8,
            header={
                "layout": layout_of(model),
                "index_coding": entropy_coding.CODER,
                "index_crc32": crc,
            },
        )

    @staticmethod
    def mean_weights(model: nn.Module) -> dict[str, torch.Tensor]:
        """Each converted tensor's values (its shared values), by parameter name."""
        return {p.name: p.mu.detach() for p in bayesian_params(model)}

    @staticmethod
    def decode(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The converted weights, by parameter name."""
        codebook = tensors["codebook"]
        if "index_coded" not in tensors:
            return {
                name.removeprefix("index."): codebook[index.long()]
                for name, index in tensors.items()
                if name.startswith("index.")
            }
        index = entropy_coding.decode(
            tensors["index_coded"], tensors["index_counts"].long(), header["index_crc32"]
        )
        return split_by_layout(codebook[index], header["layout"])

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
    contract: InputContract | None = None,
) -> ExportReport:
    """Write a compressed ``model`` (every converted weight shared) in its method's format.

    Args:
        model: A model compressed by :func:`pwf_core.compress` (or the round driver).
        path: Output ``.safetensors`` file (written atomically).
        spec: The architecture, so that :func:`load_compressed` can rebuild it without an
            instance; leave it out for your own model class.
        config: Plain data to record in the header (e.g. the experiment config).
        contract: How a raw sample becomes the model's input (the dataset's
            :attr:`~pwf_core.data.ImageDataset.contract`), recorded in the header.

    Raises:
        NotCompressedError: when the model was never converted or some converted weight is
            free.
    """
    if not bayesian_params(model):
        raise NotCompressedError("the model has no converted weights: compress it first")
    try:
        fmt = format_for(model)
    except LookupError:
        raise NotCompressedError(
            "every converted weight must be fixed before export (run every step)"
        ) from None
    encoded = fmt.encode(model)
    plain = plain_state(model)
    converted = {p.name for p in bayesian_params(model)}
    others = {name: t for name, t in plain.items() if name not in converted}
    tensors = encoded.tensors | {f"{_OTHER}{name}": t for name, t in others.items()}
    header = {
        "format_version": FORMAT_VERSION,
        "format": fmt.name,
        "model": spec.to_dict() if spec is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config or {},
        "sha256": tensor_digest(tensors),
        **encoded.header,
    }
    if contract is not None:
        header[CONTRACT_KEY] = contract.as_dict()
    # The header's own sha256 covers the tensors (files of format 2 and 3 carry it).
    path = save_tensors(path, tensors, {_METADATA_KEY: json.dumps(header)}, checksum=False)
    file_bytes = path.stat().st_size
    header_bytes = file_bytes - _nbytes(tensors)
    return ExportReport(
        path=path,
        file_bytes=file_bytes,
        float32_bytes=_nbytes(plain),
        fixed_length_bytes=header_bytes + encoded.fixed_length_bytes + _nbytes(others),
        entropy_bound_bytes=encoded.bound_bytes + _nbytes(others),
        header_bytes=header_bytes,
        shared_weights=encoded.shared_weights,
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
    """The JSON header of an exported model (architecture, config, format).

    Raises:
        CompressedFileError: for a truncated or damaged file, one that is no pwf compressed
            model, or one written by a newer pwf.
    """
    if Path(path).is_dir():
        raise CompressedFileError(f"'{path}' is a folder, not a compressed model file")
    if not Path(path).is_file():
        raise CompressedFileError(f"'{path}' does not exist")
    try:
        metadata = read_metadata(path)
    except CheckpointError as err:
        raise CompressedFileError(str(err)) from None
    if _METADATA_KEY not in metadata:
        raise CompressedFileError(
            f"'{path}' is not a pwf compressed model (no '{_METADATA_KEY}' header)"
        )
    try:
        header = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError:
        raise CompressedFileError(f"'{path}' has a damaged header") from None
    if not isinstance(header, dict) or "format" not in header:
        raise CompressedFileError(
            f"'{path}' is a pwf checkpoint of a run, not a compressed model (a run writes "
            "its compressed model as final/model.pwf.safetensors once every step ran)"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version < _OLDEST_VERSION:
        raise CompressedFileError(f"'{path}' has no file format version this pwf knows")
    if version > FORMAT_VERSION:
        raise CompressedFileError(
            f"'{path}' was written by a newer pwf (file format {version}; this one reads "
            f"{_OLDEST_VERSION} to {FORMAT_VERSION}): upgrade pwf to load it"
        )
    return header


def _read_tensors(path: str | Path, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_tensors(path)
    except CheckpointError as err:
        raise CompressedFileError(str(err)) from None
    if "sha256" in header and tensor_digest(tensors) != header["sha256"]:
        raise CompressedFileError(
            f"'{path}' is corrupted: its tensors do not match the checksum saved with them"
        )
    return tensors


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """A plain ``nn.Module`` (in eval mode) from an exported file.

    Args:
        path: A file written by :func:`save_compressed`.
        model: A fresh instance of the architecture to load into (needed for your own model
            classes); without it, a registered or timm architecture is rebuilt from the header.

    Raises:
        CompressedFileError: when the file is truncated, corrupted or from a newer pwf.
        CheckpointError: when the file names no architecture and no ``model`` is given, or
            does not fit ``model``.
    """
    header = read_header(path)
    try:
        fmt = format_named(header["format"])
    except KeyError as err:
        raise CompressedFileError(f"'{path}': {err.args[0]}") from None
    tensors = _read_tensors(path, header)
    own = {name: t for name, t in tensors.items() if not name.startswith(_OTHER)}
    state = {n.removeprefix(_OTHER): t for n, t in tensors.items() if n.startswith(_OTHER)}
    try:
        decoded = fmt.decode(own, header)
    except CompressedFileError as err:
        raise CompressedFileError(f"'{path}': {err}") from None
    except (KeyError, ValueError, RuntimeError, IndexError) as err:
        raise CompressedFileError(f"'{path}' is damaged: {err}") from None
    state |= decoded
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
        params = dict(model.named_parameters())
        model.__dict__[_SHARED] = tuple(name for name in decoded if name in params)
    return model.eval()
