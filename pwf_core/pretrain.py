"""The deterministic model before conversion: build it for a dataset, and pretrain it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.config import ExperimentConfig
from pwf_core.data import ImageDataset
from pwf_core.metrics import evaluate
from pwf_core.models import ModelSpec, load_weights
from pwf_core.train import Progress, train


def model_spec(config: ExperimentConfig, dataset: ImageDataset) -> ModelSpec:
    """The config's architecture sized for ``dataset``."""
    return ModelSpec(
        name=config.model.name,
        num_classes=dataset.num_classes,
        in_chans=dataset.in_chans,
        img_size=dataset.img_size,
        kwargs=dict(config.model.kwargs),
    )


def build_experiment_model(config: ExperimentConfig, dataset: ImageDataset) -> nn.Module:
    """The config's architecture sized for ``dataset``, with ``model.weights`` loaded if given.

    The initialisation is seeded from the pretraining seed (shared by replicates).
    """
    seed_everything(derive_seed(config.pretrain_seed, "model-init"))
    model = model_spec(config, dataset).build()
    if config.model.weights is not None:
        load_weights(model, config.model.weights)
    return model


@dataclass
class PretrainResult:
    """Curves and final metrics of pretraining."""

    epoch_losses: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def pretrain(
    model: nn.Module,
    dataset: ImageDataset,
    config: ExperimentConfig,
    device: torch.device | str,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Train the deterministic model for ``pretrain.epochs`` (cosine schedule) and evaluate it.

    Validation accuracy is recorded after each epoch when the dataset has a validation split.
    """
    seed_everything(derive_seed(config.pretrain_seed, "pretrain"))
    cfg = config.pretrain
    model.to(device)
    loader = dataset.loader(
        "train",
        cfg.batch_size,
        shuffle=True,
        seed=derive_seed(config.pretrain_seed, "pretrain-data"),
    )
    loader.to(device)
    result = PretrainResult()
    val_loader = None
    if dataset.val is not None:
        val_loader = dataset.loader("val", config.data.eval_batch_size).to(device)

    def record_validation(epoch: int, loss: float) -> None:
        if val_loader is not None:
            result.val_acc.append(evaluate(model, val_loader, device)["cls/acc"])

    run = train(
        model,
        loader,
        cfg,
        cfg.epochs,
        device=device,
        cosine=cfg.cosine,
        on_epoch_end=record_validation,
        progress=Progress(desc="pretrain", bar=progress, log=log),
    )
    result.epoch_losses, result.seconds = run.epoch_losses, run.seconds
    test_loader = dataset.loader("test", config.data.eval_batch_size).to(device)
    result.test_metrics = evaluate(model, test_loader, device)
    return result
