"""Time one training step of a deterministic model against its Bayesian conversion.

Same batch, same optimiser (pwf's: SGD with momentum and weight decay, sigmas without decay),
same grad clipping, same thread count; the Bayesian step samples every conv/linear weight (and
bias) and its backward carries the sigma regulariser. Two modes, each Bayesian against
deterministic in the same run: ``eager`` and ``compiled`` (both models through pwf's
``compiled``: ``torch.compile(fullgraph=True)``, the optimiser eager as in ``pwf.train``).

Each row gives the median step and the ratio, and the breakdown of where the Bayesian step's
extra milliseconds go: the phases of the step (forward, backward, clip, optimiser) timed
apart, the weight noise alone (the same fill on the same tensors), and the aten operators with
the largest extra self time in a profile. Writes ``benchmarks/results/bayes_overhead.json``.

Usage: ``python benchmarks/bayes_overhead.py [--repeats N] [--models resnet18,small_cnn]``
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
from torch.profiler import ProfilerActivity, profile

from pwf_core.bayes import (
    bayesian_params,
    fill_standard_normal_,
    set_sigma_regulariser,
    to_bayesian,
)
from pwf_core.config import OptimConfig
from pwf_core.methods.pwfn.variance import DEFAULT_REG, init_sigma_
from pwf_core.models import build_model
from pwf_core.train import build_optimizer, compiled

RESULTS = Path(__file__).parent / "results" / "bayes_overhead.json"
CASES = {
    # model: (in_chans, img_size, batch)
    "resnet18": (3, 32, 64),
    "small_cnn": (1, 8, 64),
}
TARGETS = {"eager": 1.3, "compiled": 1.15}
PHASES = ("forward", "backward", "clip", "optimizer")


def make_step(model: nn.Module, network: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """One training step (forward, backward, clip, update) that records its phases' times."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, momentum=0.9, weight_decay=1e-4))
    model.train()
    phases: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def step(record: bool = True) -> None:
        marks = [time.perf_counter()]
        loss = nn.functional.cross_entropy(network(images), labels)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if record:
            for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
                phases[phase].append(end - start)

    return step, phases


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 2)


def noise_ms(model: nn.Module, repeats: int) -> float:
    """Time of drawing every converted tensor's noise once, as a sampling forward does."""
    buffers = [torch.empty_like(t) for p in bayesian_params(model) for t in (p.mu,)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for eps in buffers:
            fill_standard_normal_(eps)
        times.append(time.perf_counter() - start)
    return _median_ms(times)


def extra_operators(det_step, bay_step, steps: int = 5, top: int = 10) -> list[dict]:
    """The aten operators whose self CPU time per step grows most from det to Bayesian."""
    per_step = {}
    for label, step in (("deterministic", det_step), ("bayesian", bay_step)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(record=False)
        per_step[label] = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    keys = set(per_step["deterministic"]) | set(per_step["bayesian"])
    rows = [
        {
            "op": key,
            "deterministic_ms": round(per_step["deterministic"].get(key, 0.0), 2),
            "bayesian_ms": round(per_step["bayesian"].get(key, 0.0), 2),
        }
        for key in keys
    ]
    for row in rows:
        row["extra_ms"] = round(row["bayesian_ms"] - row["deterministic_ms"], 2)
    return sorted(rows, key=lambda row: -row["extra_ms"])[:top]


def measure(name: str, mode: str, repeats: int) -> dict:
    chans, size, batch = CASES[name]
    torch.manual_seed(0)
    deterministic = build_model(name, num_classes=10, in_chans=chans, img_size=size)
    bayesian = copy.deepcopy(deterministic)
    to_bayesian(bayesian)
    init_sigma_(bayesian)
    set_sigma_regulariser(bayesian, DEFAULT_REG)
    images = torch.randn(batch, chans, size, size)
    labels = torch.randint(0, 10, (batch,))
    networks = {
        "deterministic": deterministic if mode == "eager" else compiled(deterministic),
        "bayesian": bayesian if mode == "eager" else compiled(bayesian),
    }
    det_step, det_phases = make_step(deterministic, networks["deterministic"], images, labels)
    bay_step, bay_phases = make_step(bayesian, networks["bayesian"], images, labels)
    compile_start = time.perf_counter()
    for _ in range(3):  # warm-up (and, compiled, the compilation)
        det_step(record=False)
        bay_step(record=False)
    warmup_s = time.perf_counter() - compile_start
    # Alternate the two so that machine noise and drift hit both alike.
    det_s, bay_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        det_step()
        det_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        bay_step()
        bay_s.append(time.perf_counter() - start)
    det, bay = statistics.median(det_s), statistics.median(bay_s)
    phases = {
        phase: {
            "deterministic_ms": _median_ms(det_phases[phase]),
            "bayesian_ms": _median_ms(bay_phases[phase]),
        }
        for phase in PHASES
    }
    for row in phases.values():
        row["extra_ms"] = round(row["bayesian_ms"] - row["deterministic_ms"], 2)
    return {
        "model": name,
        "mode": mode,
        "input": [batch, chans, size, size],
        "params": sum(p.numel() for p in deterministic.parameters()),
        "deterministic_step_ms": round(det * 1e3, 2),
        "bayesian_step_ms": round(bay * 1e3, 2),
        "ratio": round(bay / det, 3),
        "target_ratio": TARGETS[mode],
        "warmup_s": round(warmup_s, 1),
        "extra_ms": round((bay - det) * 1e3, 2),
        "phases": phases,
        "noise_ms": noise_ms(bayesian, repeats) if mode == "eager" else None,
        "extra_operators": extra_operators(det_step, bay_step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--modes", default=",".join(TARGETS))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            row = measure(name, mode, args.repeats)
            rows.append(row)
            summary = {k: row[k] for k in ("model", "mode", "ratio", "extra_ms", "noise_ms")}
            print(json.dumps({**summary, "phases": row["phases"]}))
    write_results(RESULTS, "bayes_overhead", rows, device="cpu")


if __name__ == "__main__":
    main()
