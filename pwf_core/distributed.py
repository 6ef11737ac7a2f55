"""Several processes on one trial (``torchrun --nproc-per-node N``): DDP training, one fixer.

When ``torch.distributed`` is initialised, :func:`pwf_core.train.train` wraps the model in
``DistributedDataParallel`` (each rank trains on its shard of the batches, gradients are
averaged), and everything a method decides from the whole network (PWFN's fixing, 2DGBNN's
mixture and merges) happens on rank 0 and is then broadcast: :func:`broadcast_run_state` sends
the model's and the method's state, structure included, so every rank holds a bit-identical
model after every step. Backends: NCCL on GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

_METHOD_PREFIX = "method."


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes checkpoints, logs and decides fixings (rank 0)."""
    return rank() == 0


def init_from_environment() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); ``False`` if none."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed, else itself."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    # Buffers (norm statistics, fixed masks) are not broadcast at every forward: each step of
    # a method ends with broadcast_run_state, which makes them rank 0's.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, broadcast_buffers=False
    )


def _transport_device(tensor_device: torch.device) -> torch.device:
    return tensor_device if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def broadcast_run_state(model: nn.Module, method) -> None:
    """Make every rank's model and method state rank 0's (shapes and structure included)."""
    if not is_distributed():
        return
    if is_main():
        tensors = dict(model.state_dict())
        tensors |= {_METHOD_PREFIX + k: v for k, v in method.state_dict().items()}
        layout = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    else:
        tensors, layout = {}, None
    message = [layout]
    dist.broadcast_object_list(message, src=0)
    layout = message[0]
    transport = _transport_device(next(model.parameters()).device)
    received = {}
    # One flat buffer and one collective per dtype on the wire (bools travel as bytes),
    # instead of one collective per tensor: a ResNet's state is hundreds of small tensors.
    by_wire: dict[torch.dtype, list[tuple[str, tuple[int, ...], torch.dtype]]] = {}
    for name, shape, dtype in layout:
        by_wire.setdefault(torch.uint8 if dtype == torch.bool else dtype, []).append(
            (name, shape, dtype)
        )
    for wire, entries in by_wire.items():
        sizes = [math.prod(shape) for _, shape, _ in entries]
        if is_main():
            flat = torch.cat(
                [tensors[name].detach().reshape(-1).to(transport, wire) for name, _, _ in entries]
            )
        else:
            flat = torch.empty(sum(sizes), dtype=wire, device=transport)
        dist.broadcast(flat, src=0)
        for (name, shape, dtype), part in zip(entries, flat.split(sizes), strict=True):
            received[name] = part.view(shape).to(dtype, copy=True)  # not views of `flat`
    if is_main():
        return
    model_state = {k: v for k, v in received.items() if not k.startswith(_METHOD_PREFIX)}
    method.before_load(model, model_state)
    method.load_state_dict(
        {
            k.removeprefix(_METHOD_PREFIX): v
            for k, v in received.items()
            if k.startswith(_METHOD_PREFIX)
        }
    )
    model.load_state_dict(model_state)
