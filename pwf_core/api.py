"""The public API: compress a trained model in place, save it, load it, strip it.

:func:`compress` is the one-call form for a notebook. :class:`Compression` is the same life
cycle one step at a time (convert → steps → finalize, with checkpoints in between); the
Prefect flow runs one task per step through it, so there is a single code path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from pwf_core._seeding import derive_seed, isolated_rng
from pwf_core.bayes import ConversionReport, ModuleFilter, is_bayesian, to_bayesian
from pwf_core.checkpoint import load_checkpoint, save_checkpoint
from pwf_core.config import ExperimentConfig
from pwf_core.data import ImageDataset, load_dataset
from pwf_core.methods.base import Method, Step, StepContext, StepRecord, history
from pwf_core.pretrain import build_experiment_model
from pwf_core.registry import MethodConfig, create_method
from pwf_core.train import TrainConfig


def _train_config(train: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
    if train is None:
        return TrainConfig()
    if isinstance(train, TrainConfig):
        return train
    return TrainConfig.model_validate(dict(train))


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    raise ValueError("the model has no parameters to compress")


def describe(method: Method, record: StepRecord) -> str:
    """One line a person reads: ``round 3/10: 60.0 % fixed | 31 values | top-1 98.61 %``."""
    parts = method.describe(record.metrics, record.step)
    if "cls/acc" in record.metrics:
        parts.append(f"top-1 {100 * record.metrics['cls/acc']:.2f} %")
    return f"{record.step}: " + " | ".join(parts) if parts else str(record.step)


class Compression:
    """One model compressed by one method, a step at a time.

    Args:
        model: The trained network; converted and edited in place.
        method: A method config, or a mapping such as ``{"method": "pwfn", "b": 4}``.
        train_loader: Batches ``(inputs, targets)`` for the training between steps.
        eval_loader: Batches to measure after each step (optional).
        train: Training between steps (:class:`~pwf_core.config.TrainConfig` or a mapping).
        seed: Every step reseeds from it and its own position.
        progress: Progress bars on a terminal.
        log: Receives one line per epoch and per step.
        mc_samples: Weight samples averaged for the final sampled metrics.
        filter_fn: ``filter_fn(module, name) -> bool``: compress only the conv/linear layers
            it accepts (with the method config's ``include``/``exclude``); the others stay
            float. Pass the same one to restore a checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        method: MethodConfig | Mapping[str, Any],
        train_loader: Iterable,
        *,
        eval_loader: Iterable | None = None,
        train: TrainConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        mc_samples: int = 0,
        filter_fn: ModuleFilter | None = None,
    ) -> None:
        self.model = model
        self.method: Method = create_method(method)
        self.filter_fn = filter_fn
        self.context = StepContext(
            train_loader=train_loader,
            eval_loader=eval_loader,
            train=_train_config(train),
            seed=seed,
            device=_device_of(model),
            progress=progress,
            log=log,
            mc_samples=mc_samples,
        )

    @classmethod
    def from_config(
        cls,
        config: ExperimentConfig,
        dataset: ImageDataset | None = None,
        *,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> Compression:
        """The experiment a config describes: a fresh (unconverted) model with its seeded
        initialisation and ``model.weights``, its loaders, the method and the training.

        Args:
            config: The experiment config.
            dataset: The dataset of ``config.data`` when already loaded (it is loaded if not).
            progress: Progress bars on a terminal.
            log: Receives one line per epoch and per step.
        """
        dataset = dataset if dataset is not None else load_dataset(config.data)
        device = config.resolved_device()
        model = build_experiment_model(config, dataset).to(device)
        train_loader = dataset.loader(
            "train",
            config.train.batch_size,
            shuffle=True,
            seed=derive_seed(config.compression_seed, "data"),
        ).to(device)
        eval_loader = dataset.loader("test", config.data.eval_batch_size).to(device)
        return cls(
            model,
            config.compression,
            train_loader,
            eval_loader=eval_loader,
            train=config.train,
            seed=config.compression_seed,
            progress=progress,
            log=log,
            mc_samples=config.eval.mc_samples,
        )

    @property
    def steps(self) -> list[Step]:
        return self.method.plan()

    def convert(self) -> ConversionReport:
        """Convert the model's conv/linear layers and initialise them for the method."""
        if any(is_bayesian(m) for m in self.model.modules()):
            raise ValueError("the model is already converted; strip() it or start from a copy")
        return self.method.convert(self.model, self.filter_fn)

    def run_step(self, step: Step | int) -> StepRecord:
        """Run one step of the plan (a :class:`Step` or its 0-based index)."""
        if isinstance(step, int):
            step = self.steps[step]
        record = self.method.run_step(self.model, step, self.context)
        self.context.say(describe(self.method, record))
        return record

    def finalize(self) -> dict[str, float]:
        """Leave the model eval-ready (sampling off) and return its final metrics."""
        return self.method.finalize(self.model, self.context)

    def save(self, path: str | Path, header: dict[str, Any] | None = None) -> Path:
        """Checkpoint the model and the method's state."""
        return save_checkpoint(path, self.model, self.method, header)

    def restore(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save` (converting the model first if needed)."""
        if not any(is_bayesian(m) for m in self.model.modules()):
            to_bayesian(
                self.model,
                attrs=self.method.converted,
                filter_fn=self.method.module_filter(self.filter_fn),
            )
        self.method.attach(self.model)
        return load_checkpoint(path, self.model, self.method)


def compress(
    model: nn.Module,
    train_loader: Iterable,
    method: MethodConfig | Mapping[str, Any],
    *,
    eval_loader: Iterable | None = None,
    train: TrainConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    mc_samples: int = 0,
    filter_fn: ModuleFilter | None = None,
) -> pd.DataFrame:
    """Compress a trained ``model`` in place with a registered method.

    Conv (1-D/2-D/3-D) and linear layers are converted, every step of the method runs
    (PWFN: train the free weights, fix more of them), and the model is left in its final form
    with sampling off, ready for ``model.eval()`` inference or :func:`save_compressed`. The
    global random state (Python, NumPy, torch, CUDA) is left as it was.

    Args:
        model: A trained network on its device (CPU or CUDA).
        train_loader: Any iterable of ``(inputs, targets)`` batches with a ``len()``.
        method: A method config or a mapping, e.g. ``{"method": "pwfn", "b": 4,
            "max_order": 2}``.
        eval_loader: Batches to measure after every step; without it, only ``ws/*`` metrics.
        train: Training between steps, e.g. ``{"lr": 1e-3, "epochs": 1}``.
        seed: Seed of every random draw; the same seed gives the same result.
        progress: Print one line per step (and progress bars on a terminal).
        mc_samples: For Bayesian methods, weight samples averaged in the final metrics.
        filter_fn: ``filter_fn(module, name) -> bool``: compress only the conv/linear layers
            it accepts, e.g. ``lambda m, name: name not in ("conv1", "fc")``; the others stay
            float (the method config's ``include``/``exclude`` patterns do the same).

    Returns:
        One row per step: ``step``, ``stage``, ``round``, ``fraction``, ``cls/acc``,
        ``ws/unique_values``, ... The final model's metrics are in ``.attrs["final"]``.
    """
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    with isolated_rng():
        run = Compression(
            model,
            method,
            train_loader,
            eval_loader=eval_loader,
            train=train,
            seed=seed,
            progress=progress,
            log=log,
            mc_samples=mc_samples,
            filter_fn=filter_fn,
        )
        run.convert()
        records = [run.run_step(step) for step in run.steps]
        final = run.finalize()
    frame = history(records)
    frame.attrs["final"] = final
    return frame
