"""Checkpoints of a run in progress: the converted model's state and its method's state.

A checkpoint is one safetensors file holding ``model.state_dict()`` (means, sigmas, fixed
masks, norms), the method's tensors under ``method.*``, and a JSON header (the step's metrics,
what the step was). Together with the seed this is all a resumed run needs: every step reseeds
from the seed and its own position and builds a fresh optimiser.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pwf_core._files import load_tensors, read_metadata, save_tensors
from pwf_core.bayes import conversion_report, to_bayesian
from pwf_core.errors import CheckpointError
from pwf_core.methods.base import Method

_METHOD_PREFIX = "method."
_HEADER_KEY = "pwf"

__all__ = [
    "CheckpointError",
    "CheckpointSize",
    "checkpoint_size",
    "load_checkpoint",
    "read_checkpoint_header",
    "save_checkpoint",
]


@dataclass(frozen=True)
class CheckpointSize:
    """What a run's files weigh, before the run.

    Args:
        plain_bytes: The unconverted model's state (the pretrained model, and at most the
            compressed one).
        checkpoint_bytes: One checkpoint of the converted model with its method's state.
    """

    plain_bytes: int
    checkpoint_bytes: int


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def checkpoint_size(build: Callable[[], nn.Module], method: Method) -> CheckpointSize:
    """Sizes of a run's files for the model ``build()`` makes, without allocating it.

    The model is built and converted on PyTorch's meta device (shapes and dtypes only), so a
    ResNet-50 costs no memory here.
    """
    try:
        with torch.device("meta"):
            model = build()
    except (RuntimeError, NotImplementedError):  # an init that needs real values
        model = build()
    plain = _state_bytes(model)
    to_bayesian(model, attrs=method.converted)
    converted = conversion_report(model).num_converted
    return CheckpointSize(plain, _state_bytes(model) + method.state_bytes(converted))


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    method: Method | None = None,
    header: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state (and ``method``'s) with a JSON ``header``, atomically."""
    tensors = dict(model.state_dict())
    if method is not None:
        tensors.update({_METHOD_PREFIX + k: v for k, v in method.state_dict().items()})
    return save_tensors(path, tensors, {_HEADER_KEY: json.dumps(header or {})})


def load_checkpoint(
    path: str | Path, model: nn.Module, method: Method | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``method``).

    ``model`` must be converted the way it was when saved (or plain, for a checkpoint saved
    before conversion). Returns the header.

    Raises:
        CheckpointError: naming the path when it is missing, unreadable or does not fit.
    """
    tensors = load_tensors(path)
    state = {k: v for k, v in tensors.items() if not k.startswith(_METHOD_PREFIX)}
    if method is not None:
        method.before_load(model, state)
        method.load_state_dict(
            {k.removeprefix(_METHOD_PREFIX): v for k, v in tensors.items() if k not in state}
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit the model: {err}") from None
    return read_checkpoint_header(path)


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a checkpoint, without loading its tensors.

    Raises:
        CheckpointError: for a missing or damaged file.
    """
    try:
        header = json.loads(read_metadata(path).get(_HEADER_KEY, "{}"))
    except ValueError:
        raise CheckpointError(f"'{path}' has a damaged header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' has a damaged header")
    return header
