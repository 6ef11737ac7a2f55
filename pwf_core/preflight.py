"""Checks that an experiment can start, run before anything is written or tracked.

A config can be valid field by field and still fail minutes later: a dataset folder whose
files do not parse, a weights file for another architecture, ``model.kwargs`` the model does
not take, a ViT whose patch grid does not fit 8x8 digits, ``device: cuda`` on a machine
without one. :func:`preflight` finds each of these in seconds and names the field or path.
"""

from __future__ import annotations

import torch

from pwf_core.bayes import check_patterns
from pwf_core.config import ExperimentConfig
from pwf_core.data import ImageDataset, load_dataset
from pwf_core.errors import ConfigError
from pwf_core.models import ModelSpec, load_weights
from pwf_core.pretrain import model_spec


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` exists on this machine."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{device}' was asked for but this machine has no CUDA device")
    if kind == "cuda":
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    if kind not in ("cpu", "cuda") and device != "auto":
        backend = getattr(torch.backends, kind, None)
        if backend is None or not backend.is_available():
            raise ConfigError(f"device: '{device}' is not available on this machine")


def _built(spec: ModelSpec) -> torch.nn.Module:
    try:
        return spec.build()
    except TypeError as err:
        raise ConfigError(
            f"model.kwargs: {spec.name} does not accept {dict(spec.kwargs)}: {err}"
        ) from None


def check_model_runs(spec: ModelSpec, dataset: ImageDataset) -> None:
    """Build the architecture for ``dataset`` and run one tiny batch through it."""
    model = _built(spec).eval()
    shape = (2, dataset.in_chans, dataset.img_size, dataset.img_size)
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except (RuntimeError, AssertionError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name: {spec.name} does not run on {dataset.name}'s "
            f"{dataset.in_chans}x{dataset.img_size}x{dataset.img_size} inputs ({first}); "
            "a ViT needs model.kwargs such as {patch_size: 2}"
        ) from None
    if out.ndim != 2 or out.shape[1] != dataset.num_classes:
        raise ConfigError(
            f"model.name: {spec.name} gives outputs of shape {tuple(out.shape)}, not "
            f"(batch, {dataset.num_classes}) logits"
        )


def check_selection(config: ExperimentConfig, spec: ModelSpec) -> None:
    """Raise :class:`ConfigError` when ``compression.include``/``exclude`` names no layer."""
    method = config.compression
    if not method.include and not method.exclude:
        return
    try:
        check_patterns(_built(spec), method.include, method.exclude)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def preflight(config: ExperimentConfig) -> ImageDataset:
    """Check everything an experiment needs before it starts; return the loaded dataset.

    Raises:
        ConfigError: for a missing device, model kwargs the model refuses, a model that
            does not run on the dataset's inputs, or layer patterns that name no layer.
        pwf_core.data.DatasetError: for dataset files that are missing or do not parse.
        pwf_core._files.CheckpointError: for a weights file that is unreadable or does not fit.
    """
    check_device(config.resolved_device())
    dataset = load_dataset(config.data)
    spec = model_spec(config, dataset)
    check_model_runs(spec, dataset)
    check_selection(config, spec)
    if config.model.weights is not None:
        load_weights(_built(spec), config.model.weights)
    return dataset
