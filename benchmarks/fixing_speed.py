"""Wall time and memory of the full 10-round PWFN fixing schedule (no training between rounds).

Cases: 1 M and 25.6 M weights drawn like real conv weights (mu ~ N(0, 0.05^2), sigma from the
power-of-two prior), and the real (randomly initialised) weights of a timm ``resnet50``, fixed
through the model (gather, fix, scatter back each round, as the round driver does). Each case
runs in its own process so that its peak resident memory can be read; "above weights" is the
peak minus the resident size once the weights exist. Writes
``benchmarks/results/fixing_speed.json``.

Usage: ``python benchmarks/fixing_speed.py [--device cuda] [--cases 1M 25.6M resnet50]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_file import write_results

RESULTS = Path(__file__).parent / "results" / "fixing_speed.json"
CASES = {"1M": 1_000_000, "25.6M": 25_600_000, "resnet50": None}
TARGETS = {"1M": {"seconds": 1.0}, "25.6M": {"seconds": 30.0, "gb_above_weights": 2.0}}


def _rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def run_case(name: str, device: str) -> dict:
    """Run one case in this process and return its measurements."""
    from pwf_core.bayes import to_bayesian
    from pwf_core.methods import FlatWeights, fixed_target
    from pwf_core.methods.pwfn import pwfn_fix_round
    from pwf_core.methods.pwfn.variance import init_sigma_, prior_sigma
    from pwf_core.methods.rounds import PAPER_SCHEDULE
    from pwf_core.models import build_model

    torch.manual_seed(0)
    model = None
    if name == "resnet50":
        model = build_model("resnet50", num_classes=1000, in_chans=3).to(device)
        to_bayesian(model)
        init_sigma_(model)
        weights = FlatWeights.gather(model)
    else:
        n = CASES[name]
        mu = (torch.randn(n) * 0.05).to(device)
        weights = FlatWeights(mu, prior_sigma(mu), torch.zeros(n, dtype=torch.bool, device=device))
    total = len(weights)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_gb("VmRSS")
    _reset_peak_rss()
    unique_per_round, round_seconds = [], []
    for fraction in PAPER_SCHEDULE:
        round_start = time.perf_counter()
        if model is not None:
            weights = FlatWeights.gather(model)
        pwfn_fix_round(weights, fixed_target(fraction, total), threshold=1.0)
        if model is not None:
            weights.scatter_(model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        round_seconds.append(round(time.perf_counter() - round_start, 3))
        unique_per_round.append(int(torch.unique(weights.mu[weights.fixed]).numel()))
    seconds = sum(round_seconds)
    result = {
        "case": name,
        "weights": total,
        "device": device,
        "seconds": round(seconds, 3),
        "round_seconds": round_seconds,
        "unique_values_per_round": unique_per_round,
        "all_fixed": bool(weights.fixed.all()),
        "rss_with_weights_gb": round(base_rss, 3),
        "peak_rss_gb": round(_rss_gb("VmHWM"), 3),
        "peak_above_weights_gb": round(_rss_gb("VmHWM") - base_rss, 3),
    }
    if device.startswith("cuda"):
        result["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    if name in TARGETS:
        result["targets"] = TARGETS[name]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single case here
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.device)))
        return
    rows = []
    for case in args.cases:
        command = [sys.executable, __file__, "--one", case, "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(row))
        rows.append(row)
    write_results(
        args.output,
        "fixing_speed",
        rows,
        schedule="paper, 10 rounds, t=1, inc=2, b=7, max order 4, zero-fix, std_mu",
        reference_numpy_1M={"seconds": 66, "peak_gb": 1.1},
    )


if __name__ == "__main__":
    main()
