"""The body of a two-process (Gloo) run: each rank compresses the same pretrained CNN."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pwf_core import Compression
from pwf_core._files import load_tensors, save_tensors
from pwf_core.config import load_config
from pwf_core.data import load_dataset
from pwf_core.methods.gbnn2d.training import dataset_size
from pwf_core.pretrain import build_experiment_model

ROOT = Path(__file__).resolve().parents[2]


def digits_compression(model: torch.nn.Module, method: dict, dataset) -> Compression:
    """The run both sides of the comparison make: one epoch per step, seeded loaders."""
    return Compression(
        model,
        method,
        dataset.loader("train", 64, shuffle=True, seed=1),
        eval_loader=dataset.loader("test", 512),
        train={"epochs": 1},
        seed=0,
        progress=False,
    )


def run_rank(rank: int, world: int, folder: str, port: int, method: dict) -> None:
    """One rank: join the group, run every step, write its state after each and its metrics."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = Path(folder)
        config = load_config(ROOT / "configs" / "default.yaml")
        dataset = load_dataset(config.data)
        model = build_experiment_model(config, dataset)
        model.load_state_dict(load_tensors(out / "pretrained.safetensors"))
        run = digits_compression(model, method, dataset)
        run.convert()
        for step in run.steps:
            record = run.run_step(step)
            save_tensors(out / f"rank{rank}_step{step.index}.safetensors", model.state_dict())
        final = run.finalize()
        kl_examples = dataset_size(run.context.train_loader)  # the N of 2DGBNN's KL / N
        (out / f"rank{rank}.json").write_text(
            json.dumps({"final": final, "last": record.metrics, "kl_examples": kl_examples})
        )
    finally:
        dist.destroy_process_group()
