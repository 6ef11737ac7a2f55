"""2DGBNN's cost: a training step of the shared-Gaussian model against the mean-field BNN and
the deterministic network, and the time to build the mixture and merge on ResNet-18.

Steps are timed on one fixed batch (forward, backward, the KL term, Adam, the method's
post-step hooks), interleaved so that machine noise hits all three alike; medians are
reported. The mixture is built from a ResNet-18's 11.2 M weights (its random initialisation,
sigmas at 1e-3 with a little spread, random gradient magnitudes: the shapes and counts of a
real run). Writes ``benchmarks/results/stochastic_sharing.json``.

Usage: ``python benchmarks/stochastic_sharing.py [--repeats N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from results_file import write_results
from torch import nn

from pwf_core.bayes import bayesian_params
from pwf_core.config import OptimConfig
from pwf_core.methods.gbnn2d import TwoDGBNN, TwoDGBNNConfig
from pwf_core.methods.gbnn2d.blending import assign_blends
from pwf_core.methods.gbnn2d.merging import merge
from pwf_core.methods.gbnn2d.network import sharing_of, weight_points
from pwf_core.models import build_model
from pwf_core.train import TrainingHooks, build_optimizer

RESULTS = Path(__file__).parent / "results" / "stochastic_sharing.json"
CASES = [("small_cnn", 1, 8, 64), ("resnet18", 3, 32, 64)]


def bayesian_model(name: str, chans: int, size: int, device: str) -> tuple[nn.Module, TwoDGBNN]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_chans=chans, img_size=size).to(device)
    method = TwoDGBNN(TwoDGBNNConfig())
    method.convert(model)
    with torch.no_grad():
        for param in bayesian_params(model):
            param.sigma.mul_(1 + 0.2 * torch.rand_like(param.sigma))
    method._num_train = 50_000
    return model, method


def make_step(model: nn.Module, hooks: TrainingHooks, images, labels, lr: float):
    optimizer = build_optimizer(model, OptimConfig(optimizer="adamw", lr=lr, weight_decay=0))
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        extra = hooks.extra_loss(model, loss)
        total = loss if extra is None else loss + extra
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        hooks.after_backward(model)
        optimizer.step()
        hooks.after_step(model)

    return step


def synchronised(step, device: str) -> float:
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(name: str, chans: int, size: int, batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    deterministic = build_model(name, num_classes=10, in_chans=chans, img_size=size).to(device)
    meanfield, meanfield_method = bayesian_model(name, chans, size, device)
    meanfield_method._stage = "bnn"
    shared, shared_method = bayesian_model(name, chans, size, device)
    shared_method.grad_magnitude = torch.rand(sum(p.mu.numel() for p in bayesian_params(shared)))
    started = time.perf_counter()
    shared_method.build_mixture(shared)
    mixture_s = time.perf_counter() - started
    shared_method._stage = "vi"
    images = torch.randn(batch, chans, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    steps = {
        "deterministic": make_step(deterministic, TrainingHooks(), images, labels, 1e-3),
        "meanfield": make_step(meanfield, meanfield_method, images, labels, 1e-4),
        "2dgbnn": make_step(shared, shared_method, images, labels, 1e-3),
    }
    for _ in range(3):
        for step in steps.values():
            step()
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(synchronised(step, device))
    median = {key: statistics.median(values) for key, values in times.items()}
    sharing = sharing_of(shared)
    return {
        "model": name,
        "input": [batch, chans, size, size],
        "weights": sum(p.mu.numel() for p in bayesian_params(shared)),
        "gaussians": sharing.num_gaussians,
        "outliers": sharing.num_outliers,
        "blended": sharing.num_blended,
        **{f"{key}_step_ms": round(1e3 * value, 2) for key, value in median.items()},
        "2dgbnn_over_meanfield": round(median["2dgbnn"] / median["meanfield"], 3),
        "meanfield_over_deterministic": round(median["meanfield"] / median["deterministic"], 3),
        "mixture_init_s": round(mixture_s, 2),
        "target_2dgbnn_over_meanfield": 1.5,
    }


def mixture_and_merge(device: str) -> dict:
    """Mixture init and one merging pass on ResNet-18's 11.2 M weights."""
    model, method = bayesian_model("resnet18", 3, 32, device)
    count = sum(p.mu.numel() for p in bayesian_params(model))
    method.grad_magnitude = torch.rand(count)
    started = time.perf_counter()
    method.build_mixture(model)
    built = time.perf_counter() - started
    sharing = sharing_of(model)
    before = sharing.num_gaussians
    points = weight_points(model)
    started = time.perf_counter()
    merged = merge(sharing, points, method.merge_rule)
    assign_blends(sharing, points)
    merge_s = time.perf_counter() - started
    return {
        "case": "resnet18 mixture init + merge",
        "weights": count,
        "gaussians_before_merge": before,
        "merged_pairs": merged,
        "gaussians_after_merge": sharing.num_gaussians,
        "outliers": sharing.num_outliers,
        "blended": sharing.num_blended,
        "mixture_init_s": round(built, 2),
        "merge_and_reblend_s": round(merge_s, 2),
        "total_s": round(built + merge_s, 2),
        "target_total_s": 60.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for name, chans, size, batch in CASES:
        row = step_times(name, chans, size, batch, args.repeats, args.device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    row = mixture_and_merge(args.device)
    print(json.dumps(row), flush=True)
    rows.append(row)
    write_results(args.output, "stochastic_sharing", rows, device=args.device)


if __name__ == "__main__":
    main()
