"""Time one training step of a deterministic model against its Bayesian conversion.

Same batch, same optimiser (SGD with momentum and weight decay, grad clipping), same thread
count; the Bayesian step samples every conv/linear weight (and bias) and its backward carries
the sigma regulariser. Reports the
median of repeated steps and the ratio Bayesian / deterministic, and writes
``benchmarks/results/bayes_overhead.json``.

Usage: ``python benchmarks/bayes_overhead.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from results_file import write_results
from torch import nn

from pwf_core.bayes import set_sigma_regulariser, to_bayesian
from pwf_core.config import OptimConfig
from pwf_core.methods.pwfn.variance import DEFAULT_REG, init_sigma_
from pwf_core.models import build_model
from pwf_core.train import build_optimizer

RESULTS = Path(__file__).parent / "results" / "bayes_overhead.json"
CASES = [
    # (model, in_chans, img_size, batch)
    ("resnet18", 3, 32, 64),
    ("small_cnn", 1, 8, 64),
]


def make_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """One SGD training step (forward, backward, clip, update) as a closure."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, momentum=0.9, weight_decay=1e-4))
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for name, chans, size, batch in CASES:
        torch.manual_seed(0)
        deterministic = build_model(name, num_classes=10, in_chans=chans, img_size=size)
        bayesian = copy.deepcopy(deterministic)
        to_bayesian(bayesian)
        init_sigma_(bayesian)
        set_sigma_regulariser(bayesian, DEFAULT_REG)
        images = torch.randn(batch, chans, size, size)
        labels = torch.randint(0, 10, (batch,))
        det_step = make_step(deterministic, images, labels)
        bay_step = make_step(bayesian, images, labels)
        for _ in range(3):  # warm-up
            det_step()
            bay_step()
        # Alternate the two so that machine noise and drift hit both alike.
        det_s, bay_s = [], []
        for _ in range(args.repeats):
            det_s.append(timed(det_step))
            bay_s.append(timed(bay_step))
        det, bay = statistics.median(det_s), statistics.median(bay_s)
        row = {
            "model": name,
            "input": [batch, chans, size, size],
            "params": sum(p.numel() for p in deterministic.parameters()),
            "deterministic_step_ms": round(det * 1e3, 2),
            "bayesian_step_ms": round(bay * 1e3, 2),
            "ratio": round(bay / det, 3),
            "target_ratio": 1.3,
        }
        rows.append(row)
        print(json.dumps(row))
    write_results(RESULTS, "bayes_overhead", rows, device="cpu")


if __name__ == "__main__":
    main()
