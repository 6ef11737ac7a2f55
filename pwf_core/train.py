"""One training loop for pretraining and for the free weights between fixing rounds.

Fixed entries (given as boolean masks per parameter) stay bit-exact: their gradients are
zeroed, and after each optimiser step their values are written back and their optimiser state
(momentum, Adam moments) is cleared, so neither weight decay nor momentum can move them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pwf_core.bayes import sigma_parameters
from pwf_core.config import OptimConfig
from pwf_core.distributed import wrap


class TrainingHooks:
    """Method-specific additions to the training step; the default adds nothing."""

    def extra_loss(self, model: nn.Module, task_loss: torch.Tensor) -> torch.Tensor | None:
        """A term added to the cross-entropy (e.g. WFN's distance regulariser, a KL term)."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after every backward pass, before clipping (e.g. to accumulate gradients)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. to keep sigmas positive)."""


def batches_per_epoch(loader: Iterable) -> int:
    """``len(loader)``; an iterable without a length cannot run a fraction of an epoch."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"the training loader ({type(loader).__name__}) has no len(): give a DataLoader "
            "or a list of batches"
        ) from None


def set_loader_epoch(loader: Iterable, epoch: int) -> None:
    """Select the shuffling of ``epoch`` where the loader (or its sampler) supports it."""
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if owner is not None and callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)
            return


class MaskedParams:
    """Keeps the masked entries of parameters bit-exact through optimiser steps.

    Args:
        masks: Boolean mask per parameter; ``True`` marks a fixed entry.
    """

    def __init__(self, masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
        self.entries = [
            (param, mask, param.detach()[mask].clone())
            for param, mask in masks.items()
            if mask.any()
        ]

    def zero_grads(self) -> None:
        for param, mask, _ in self.entries:
            if param.grad is not None:
                param.grad.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        for param, mask, values in self.entries:
            param.masked_scatter_(mask, values)
            for state in optimizer.state.get(param, {}).values():
                if isinstance(state, torch.Tensor) and state.shape == param.shape:
                    state.masked_fill_(mask, 0.0)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters; sigmas get no weight decay."""
    sigma_ids = {id(p) for p in sigma_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in trainable if id(p) not in sigma_ids],
            "weight_decay": config.weight_decay,
        },
        {
            "params": [p for p in trainable if id(p) in sigma_ids],
            "weight_decay": 0.0,
            "lr": config.sigma_lr or config.lr,
        },
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class TrainResult:
    """What one call of :func:`train` did."""

    steps: int
    mean_loss: float
    train_acc: float
    seconds: float
    epoch_losses: list[float]


def train(
    model: nn.Module,
    loader: Iterable,
    optim: OptimConfig,
    epochs: float,
    device: torch.device | str = "cpu",
    fixed_masks: Mapping[nn.Parameter, torch.Tensor] | None = None,
    hooks: TrainingHooks | None = None,
    cosine: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int, float], None] | None = None,
    epoch_offset: int = 0,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` (a fraction is allowed) with masked entries frozen.

    Args:
        model: The network, already on ``device``.
        loader: Batches ``(inputs, targets)``; its (or its sampler's) ``set_epoch`` is called
            with ``epoch_offset + epoch`` so shuffling is reproducible.
        optim: Optimiser, learning rate, momentum, weight decay, grad clip.
        epochs: Epochs to run; ``0.05`` runs 5 % of one epoch's batches.
        device: Where batches go; CUDA turns on bf16 autocast.
        fixed_masks: Boolean mask per parameter of entries that must not change.
        hooks: Method-specific loss term and post-step edit.
        cosine: Cosine-anneal the learning rate to zero over the run.
        progress: Show a progress bar per epoch (when stderr is a terminal).
        desc: Label of the progress bar and of the log lines.
        on_epoch_end: Called with ``(epoch, mean loss)`` after each epoch (e.g. validation).
        epoch_offset: Added to the epoch number given to ``set_epoch``.
        log: Receives one line per epoch (progress off a terminal: workers, CI, Prefect logs).

    Returns:
        Steps taken, mean loss, accuracy on the training batches, wall time, loss per epoch.
    """
    device = torch.device(device)
    hooks = hooks or TrainingHooks()
    per_epoch = batches_per_epoch(loader)
    total_steps = math.ceil(epochs * per_epoch)
    result = TrainResult(0, float("nan"), float("nan"), 0.0, [])
    if total_steps == 0:
        return result
    optimizer = build_optimizer(model, optim)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps) if cosine else None
    )
    masked = MaskedParams(fixed_masks or {})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    use_amp = device.type == "cuda"
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    model.train()
    network = wrap(model)  # DistributedDataParallel under torchrun
    num_epochs = math.ceil(total_steps / per_epoch)
    for epoch in range(num_epochs):
        set_loader_epoch(loader, epoch_offset + epoch)
        steps_this_epoch = min(per_epoch, total_steps - result.steps)
        epoch_loss = torch.zeros((), device=device)
        bar = tqdm(
            total=steps_this_epoch,
            desc=f"{desc} epoch {epoch + 1}/{num_epochs}",
            leave=False,
            disable=None if progress else True,  # None: only on a terminal
            dynamic_ncols=True,
        )
        for step_in_epoch, (images, labels) in enumerate(loader):
            if step_in_epoch >= steps_this_epoch:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = network(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
                extra = hooks.extra_loss(model, loss)
                total = loss if extra is None else loss + extra
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            masked.zero_grads()
            hooks.after_backward(model)
            if optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, optim.grad_clip)
            optimizer.step()
            masked.restore(optimizer)
            hooks.after_step(model)
            if scheduler is not None:
                scheduler.step()
            detached = loss.detach()
            loss_sum += detached * len(labels)
            epoch_loss += detached
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
            result.steps += 1
            bar.update(1)
        bar.close()
        result.epoch_losses.append(epoch_loss.item() / max(steps_this_epoch, 1))
        if log is not None:
            log(
                f"{desc}: epoch {epoch + 1}/{num_epochs} loss {result.epoch_losses[-1]:.4f} "
                f"({time.perf_counter() - start:.1f} s)"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, result.epoch_losses[-1])
            model.train()
    result.mean_loss = loss_sum.item() / max(seen, 1)
    result.train_acc = correct.item() / max(seen, 1)
    result.seconds = time.perf_counter() - start
    return result
