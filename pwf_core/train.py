"""One training loop for pretraining and for the free weights between fixing rounds, and its
settings (:class:`OptimConfig`, :class:`PretrainConfig`, :class:`TrainConfig`).

Fixed entries (given as boolean masks per parameter) stay bit-exact: their gradients are
zeroed, and after each optimiser step their values are written back and their optimiser state
(momentum, Adam moments) is cleared, so neither weight decay nor momentum can move them.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from pwf_core.bayes import regulariser_inputs_, sigma_parameters
from pwf_core.distributed import world_size, wrap
from pwf_core.types import NonNegativeFloat, PositiveFloat, PositiveInt, Section


class OptimConfig(Section):
    """Optimiser settings shared by pretraining and the training between fixing rounds.

    Args:
        sigma_lr: Learning rate of the sigmas of converted weights (default: ``lr``).
        compile: Run the training steps' forward and backward through
            ``torch.compile(model, fullgraph=True)`` (the first step of a run compiles:
            seconds on a GPU, up to a minute for a ResNet on a CPU). Evaluation stays eager.
        channels_last: Train in the channels-last memory format (faster convolutions on
            tensor-core GPUs; 4-D weights and inputs only).
        amp: On CUDA, run forward and loss under bf16 autocast (weights, sigmas and the
            optimiser stay float32); no effect on the CPU.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 1e-3
    sigma_lr: PositiveFloat | None = None
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: NonNegativeFloat = 1e-4
    grad_clip: PositiveFloat | None = 1.0
    batch_size: PositiveInt = 64
    compile: bool = False
    channels_last: bool = False
    amp: bool = True


class PretrainConfig(OptimConfig):
    """Deterministic training before conversion. ``epochs: 0`` uses the weights as given."""

    epochs: NonNegativeFloat = 20.0
    lr: PositiveFloat = 0.05
    cosine: bool = True


class TrainConfig(OptimConfig):
    """Training of the free weights before each fixing round.

    Args:
        epochs: Epochs before every round but the first.
        first_round_epochs: Epochs before the first round (the paper: 5 % of one epoch).
    """

    epochs: NonNegativeFloat = 3.0
    first_round_epochs: NonNegativeFloat = 0.05

    def epochs_before(self, round_index: int) -> float:
        """Epochs of training that precede fixing round ``round_index``."""
        return self.first_round_epochs if round_index == 0 else self.epochs


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
        # Whole-tensor copies and torch.where, not boolean indexing or masked_scatter_: their
        # shapes depend on the mask's values, which would make every step wait for the device.
        # (fixed_masks() leaves out tensors without a fixed entry; any other costs a pass.)
        self.entries = [(param, mask, param.detach().clone()) for param, mask in masks.items()]

    def zero_grads(self) -> None:
        for param, mask, _ in self.entries:
            if param.grad is not None:
                param.grad.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        for param, mask, values in self.entries:
            torch.where(mask, values, param, out=param)
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


@dataclass(frozen=True)
class Progress:
    """How a training run reports itself.

    Args:
        desc: Label of the progress bar and of the log lines (``round 3/10``).
        bar: A progress bar per epoch, shown only when stderr is a terminal.
        log: Receives one line per epoch (progress off a terminal: workers, CI, Prefect logs).
    """

    desc: str = "train"
    bar: bool = True
    log: Callable[[str], None] | None = None


class _Step:
    """One optimiser step with fixed entries held, for a whole :func:`train` call."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        cosine: bool,
        fixed_masks: Mapping[nn.Parameter, torch.Tensor] | None,
        hooks: TrainingHooks,
    ) -> None:
        self.model, self.optim, self.hooks = model, optim, hooks
        self.optimizer = build_optimizer(model, optim)
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps)
            if cosine
            else None
        )
        self.masked = MaskedParams(fixed_masks or {})
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def __call__(self, total: torch.Tensor) -> None:
        """Backward of ``total``, then clip, update, restore the fixed entries, anneal."""
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.masked.zero_grads()
        self.hooks.after_backward(self.model)
        if self.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.optim.grad_clip)
        self.optimizer.step()
        self.masked.restore(self.optimizer)
        self.hooks.after_step(self.model)
        if self.scheduler is not None:
            self.scheduler.step()


def compiled(network: nn.Module) -> nn.Module:
    """``network`` through ``torch.compile`` for training steps.

    ``fullgraph=True`` on one process: a converted model compiles whole (a graph break would
    be a regression, not a slowdown to live with). Under ``torchrun``, DDP's optimiser splits
    the graph at its gradient buckets, which ``fullgraph`` forbids. On a CPU the weight noise
    comes from pwf's threaded fill (an operator the graph calls) and every other random op
    from torch's own kernels (``fallback_random``: Inductor's generated CPU normal is several
    times slower); on a GPU Inductor generates the noise inside the fused sample kernel. A
    seeded compiled run reproduces itself, but draws other noise than an eager run.
    """
    regulariser_inputs_(network)
    on_cpu = all(p.device.type == "cpu" for p in network.parameters())
    return torch.compile(network, fullgraph=world_size() == 1, options={"fallback_random": on_cpu})


def train(
    model: nn.Module,
    loader: Iterable,
    optim: OptimConfig,
    epochs: float,
    *,
    device: torch.device | str = "cpu",
    fixed_masks: Mapping[nn.Parameter, torch.Tensor] | None = None,
    hooks: TrainingHooks | None = None,
    cosine: bool = False,
    epoch_offset: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
    progress: Progress | bool = True,
) -> TrainResult:
    """Train ``model`` for ``epochs`` (a fraction is allowed) with masked entries frozen.

    Args:
        model: The network, already on ``device``.
        loader: Batches ``(inputs, targets)``; its (or its sampler's) ``set_epoch`` is called
            with ``epoch_offset + epoch`` so shuffling is reproducible.
        optim: Optimiser, learning rate, momentum, weight decay, grad clip.
        epochs: Epochs to run; ``0.05`` runs 5 % of one epoch's batches.
        device: Where batches go; on CUDA, bf16 autocast unless ``optim.amp`` is off.
        fixed_masks: Boolean mask per parameter of entries that must not change.
        hooks: Method-specific loss term and post-step edits.
        cosine: Cosine-anneal the learning rate to zero over the run.
        epoch_offset: Added to the epoch number given to ``set_epoch``.
        on_epoch_end: Called with ``(epoch, mean loss)`` after each epoch (e.g. validation).
        progress: How the run reports itself; ``False`` for silence, ``True`` for a bar.

    Returns:
        Steps taken, mean loss, accuracy on the training batches, wall time, loss per epoch.
    """
    device = torch.device(device)
    report = progress if isinstance(progress, Progress) else Progress(bar=progress)
    per_epoch = batches_per_epoch(loader)
    total_steps = math.ceil(epochs * per_epoch)
    result = TrainResult(0, float("nan"), float("nan"), 0.0, [])
    if total_steps == 0:
        return result
    hooks = hooks or TrainingHooks()
    step = _Step(model, optim, total_steps, cosine, fixed_masks, hooks)
    totals = _Totals(device)
    start = time.perf_counter()
    memory_format = torch.channels_last if optim.channels_last else torch.preserve_format
    amp = device.type == "cuda" and optim.amp
    if optim.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D tensors only; the rest stay as they are
    model.train()
    network = wrap(model)  # DistributedDataParallel under torchrun
    if optim.compile:
        network = compiled(network)
    num_epochs = math.ceil(total_steps / per_epoch)
    for epoch in range(num_epochs):
        set_loader_epoch(loader, epoch_offset + epoch)
        batches = min(per_epoch, total_steps - result.steps)
        bar = tqdm(
            total=batches,
            desc=f"{report.desc} epoch {epoch + 1}/{num_epochs}",
            leave=False,
            disable=None if report.bar else True,  # None: only on a terminal
            dynamic_ncols=True,
        )
        epoch_loss = totals.begin_epoch()
        for images, labels in itertools.islice(loader, batches):
            images = images.to(device, non_blocking=True)
            if images.dim() == 4:
                images = images.contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                logits = network(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
                extra = hooks.extra_loss(model, loss)
            step(loss if extra is None else loss + extra)
            totals.add(loss, logits, labels)
            result.steps += 1
            bar.update(1)
        bar.close()
        result.epoch_losses.append(epoch_loss.item() / max(batches, 1))
        if report.log is not None:
            report.log(
                f"{report.desc}: epoch {epoch + 1}/{num_epochs} loss "
                f"{result.epoch_losses[-1]:.4f} ({time.perf_counter() - start:.1f} s)"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, result.epoch_losses[-1])
            model.train()
    result.mean_loss, result.train_acc = totals.means()
    result.seconds = time.perf_counter() - start
    return result


class _Totals:
    """Loss and accuracy sums kept on the device: read once an epoch, not once a step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.epoch_loss = torch.zeros((), device=device)
        self.seen = 0

    def begin_epoch(self) -> torch.Tensor:
        self.epoch_loss = torch.zeros_like(self.epoch_loss)
        return self.epoch_loss

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        detached = loss.detach()
        self.loss += detached * len(labels)
        self.epoch_loss += detached
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)

    def means(self) -> tuple[float, float]:
        """Mean loss and accuracy over every batch."""
        seen = max(self.seen, 1)
        return self.loss.item() / seen, self.correct.item() / seen
