"""The round driver: convert, init variance, then per fraction: train free weights, fix, evaluate.

Each round is a pure function of the model it receives, the experiment seed and the round
index (it reseeds from them), so a run resumed at round ``k`` from round ``k-1``'s checkpoint
ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from pwf_core.bayes import ConversionReport, fixed_masks, to_bayesian
from pwf_core.config import ExperimentConfig
from pwf_core.data import ImageDataset
from pwf_core.methods import FixingMethod, FlatWeights, create_method, fixed_target
from pwf_core.metrics import evaluate, weight_sharing_metrics
from pwf_core.reproducibility import derive_seed, seed_everything
from pwf_core.train import train


@dataclass
class RoundRecord:
    """What one fixing round did and how the model scored right after its fixing.

    Args:
        round: Round index (0-based).
        fraction: Schedule fraction fixed after the round.
        metrics: ``cls/*``, ``cal/*``, ``ws/*`` after fixing, plus ``train/*`` and ``time/*``.
        summary: One row per greedy step (``round, step, centre, order, threshold, count``).
    """

    round: int
    fraction: float
    metrics: dict[str, float]
    summary: pd.DataFrame = field(repr=False)


def prepare_model(model: nn.Module, method: FixingMethod) -> ConversionReport:
    """Convert conv/linear layers to (mu, sigma) and let the method initialise them.

    Deterministic methods (WFN, k-means, uniform) train with sampling off.
    """
    report = to_bayesian(model)
    method.attach(model)
    method.prepare(model)
    return report


def fixing_round(
    model: nn.Module,
    method: FixingMethod,
    round_index: int,
    config: ExperimentConfig,
    dataset: ImageDataset,
    device: torch.device | str,
    progress: bool = True,
) -> RoundRecord:
    """Train the free weights, fix up to the round's fraction, and evaluate after fixing.

    Args:
        model: A prepared (converted) model on ``device``; edited in place.
        method: The fixing method (its hooks shape the training).
        round_index: Which entry of ``config.fixing.schedule`` this round reaches.
        config: The experiment config (training, schedule, seed).
        dataset: Train split for training, test split for the metrics.
        device: Where to compute.
        progress: Show progress bars while training.
    """
    seed_everything(derive_seed(config.seed, "round", round_index))
    fraction = config.fixing.schedule[round_index]
    loader = dataset.loader(
        "train",
        config.train.batch_size,
        shuffle=True,
        seed=derive_seed(config.seed, "round-data", round_index),
    ).to(device)
    trained = train(
        model,
        loader,
        config.train,
        epochs=config.train.epochs_before(round_index),
        device=device,
        fixed_masks=fixed_masks(model),
        hooks=method,
        progress=progress,
        desc=f"round {round_index}",
    )
    start = time.perf_counter()
    weights = FlatWeights.gather(model)
    summary = method.fix(weights, fixed_target(fraction, len(weights)), round_index)
    weights.scatter_(model)
    fix_seconds = time.perf_counter() - start
    test_loader = dataset.loader("test", config.data.eval_batch_size).to(device)
    metrics = {**evaluate(model, test_loader, device), **weight_sharing_metrics(model)}
    metrics |= {
        "train/loss": trained.mean_loss,
        "train/steps": float(trained.steps),
        "time/train_s": trained.seconds,
        "time/fix_s": fix_seconds,
        "time/eval_s": time.perf_counter() - start - fix_seconds,
    }
    summary.insert(0, "round", round_index)
    return RoundRecord(round_index, fraction, metrics, summary)


def final_metrics(
    model: nn.Module,
    method: FixingMethod,
    config: ExperimentConfig,
    dataset: ImageDataset,
    device: torch.device | str,
) -> dict[str, float]:
    """The fixed model's metrics with sampling off, and with it on (``*_mc`` keys) when the
    method is Bayesian and ``eval.mc_samples > 0``."""
    test_loader = dataset.loader("test", config.data.eval_batch_size).to(device)
    metrics = {**evaluate(model, test_loader, device), **weight_sharing_metrics(model)}
    if method.bayesian and config.eval.mc_samples > 0:
        seed_everything(derive_seed(config.seed, "final-eval"))
        sampled = evaluate(model, test_loader, device, mc_samples=config.eval.mc_samples)
        metrics.update({f"{key}_mc": value for key, value in sampled.items()})
    return metrics


def run_schedule(
    model: nn.Module,
    config: ExperimentConfig,
    dataset: ImageDataset,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_round_end: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Run every fixing round of ``config`` on a pretrained ``model`` (converted in place).

    Returns:
        One record per round; after the last, every converted weight holds a codebook value.
    """
    method = create_method(config.fixing)
    model.to(device)
    prepare_model(model, method)
    records = []
    for round_index in range(len(config.fixing.schedule)):
        record = fixing_round(model, method, round_index, config, dataset, device, progress)
        records.append(record)
        if on_round_end is not None:
            on_round_end(record)
    return records
