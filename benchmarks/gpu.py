"""The GPU check: what a CUDA worker does with pwf's training path, for anyone with a GPU.

On synthetic CIFAR-shaped data (10,240 random 3x32x32 images, 10 classes, batch 256, held on
the GPU), with a timm ``resnet18``:

* one training epoch of the deterministic model, of PWFN (sampling, sigma regulariser, a
  quarter of the weights fixed) and of both 2DGBNN stages (mean-field BNN, shared Gaussians),
  each with bf16 autocast on and off and ``torch.compile`` on and off (compiled epochs are
  timed after a warm-up epoch that compiles); peak GPU memory of each;
* the host syncs in those epochs (``torch.cuda.set_sync_debug_mode("warn")``): the loop
  itself reads two numbers back per epoch (the epoch loss and the accuracy), a step none;
* one PWFN fixing round on the 11.2 M weights of the model, on CUDA against the CPU;
* the default ``pwf run --set device=cuda`` (digits, local Prefect, MLflow in SQLite), its
  wall time and exit status.

Without CUDA it prints one line and writes nothing. Writes ``benchmarks/results/gpu.json``.

Usage: ``python benchmarks/gpu.py [--images N] [--skip-run]``
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from results_file import write_results

RESULTS = Path(__file__).parent / "results" / "gpu.json"
BATCH = 256


def _loader(images: int, device: torch.device):
    from pwf_core.data.loaders import TensorLoader

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (images,), generator=generator)
    return TensorLoader(x, y, BATCH, shuffle=True, seed=0, augment="crop_flip").to(device)


def _variant(base: torch.nn.Module, kind: str, num_train: int):
    """The model and training hooks of one variant, as pwf's methods set them up."""
    from pwf_core.bayes import bayesian_params, set_sigma_regulariser, to_bayesian
    from pwf_core.methods.gbnn2d import TwoDGBNNConfig
    from pwf_core.methods.gbnn2d.method import TwoDGBNN
    from pwf_core.methods.gbnn2d.training import MeanFieldHooks, SharedGaussianHooks
    from pwf_core.methods.pwfn.variance import DEFAULT_REG, init_sigma_

    model = copy.deepcopy(base)
    if kind == "deterministic":
        return model, None, None
    if kind == "pwfn":
        to_bayesian(model)
        init_sigma_(model)
        set_sigma_regulariser(model, DEFAULT_REG)
        for param in bayesian_params(model):
            param.fixed_mask.view(-1)[::4] = True
        masks = {t: p.fixed_mask for p in bayesian_params(model) for t in (p.mu, p.sigma)}
        return model, None, masks
    config = TwoDGBNNConfig(gaussians=64)
    method = TwoDGBNN(config)
    method.convert(model)
    prior = torch.cat([p.mu.detach().flatten() for p in bayesian_params(model)])
    if kind == "2dgbnn-meanfield":
        return model, MeanFieldHooks(prior, config, num_train, collect_gradients=False), None
    method.build_mixture(model)
    return model, SharedGaussianHooks(model._pwf_sharing, config, num_train), None


def train_epochs(base, kind: str, loader, device, amp: bool, compile_: bool) -> dict:
    from pwf_core.train import OptimConfig, train

    model, hooks, masks = _variant(base, kind, loader.dataset_size)
    model.to(device)
    optim = OptimConfig(lr=0.01, amp=amp, compile=compile_)
    train(model, loader, optim, 1, device=device, hooks=hooks, fixed_masks=masks, progress=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = train(
            model, loader, optim, 1, device=device, hooks=hooks, fixed_masks=masks, progress=False
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {
        "variant": kind,
        "amp_bf16": amp,
        "compile": compile_,
        "epoch_s": round(seconds, 3),
        "images_per_s": round(loader.dataset_size / seconds, 1),
        "steps": result.steps,
        "host_syncs": len(syncs),
        "sync_sites": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})[:10],
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3),
        "final_loss": round(result.mean_loss, 4),
    }


def fixing_round(base, device: str) -> dict:
    from pwf_core.bayes import to_bayesian
    from pwf_core.methods import FlatWeights, fixed_target
    from pwf_core.methods.pwfn import pwfn_fix_round
    from pwf_core.methods.pwfn.variance import init_sigma_
    from pwf_core.methods.rounds import PAPER_SCHEDULE

    model = copy.deepcopy(base).to(device)
    to_bayesian(model)
    init_sigma_(model)
    weights = FlatWeights.gather(model)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pwfn_fix_round(weights, fixed_target(PAPER_SCHEDULE[0], len(weights)), threshold=1.0)
    weights.scatter_(model)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"device": device, "weights": len(weights), "round_s": time.perf_counter() - start}


def default_run() -> dict:
    """``pwf run --set device=cuda`` in a fresh folder, as the README's first command."""
    pwf = shutil.which("pwf") or str(Path(sys.executable).with_name("pwf"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        done = subprocess.run(
            [pwf, "run", "--set", "device=cuda"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
    tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
    return {"exit": done.returncode, "wall_s": round(time.perf_counter() - start, 1), "tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_240)
    parser.add_argument("--skip-run", action="store_true", help="leave out the pwf run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu.py: no CUDA device here (torch {torch.__version__}); nothing measured")
        return
    from pwf_core.models import build_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    base = build_model("resnet18", num_classes=10, in_chans=3, img_size=32)
    loader = _loader(args.images, device)
    rows = []
    for kind in ("deterministic", "pwfn", "2dgbnn-meanfield", "2dgbnn-shared"):
        for compile_ in (False, True):
            for amp in (True, False):
                row = train_epochs(base, kind, loader, device, amp, compile_)
                rows.append(row)
                print(json.dumps(row), flush=True)
    fixing = [fixing_round(base, "cuda"), fixing_round(base, "cpu")]
    fixing_summary = {
        "weights": fixing[0]["weights"],
        "cuda_s": round(fixing[0]["round_s"], 3),
        "cpu_s": round(fixing[1]["round_s"], 3),
        "speedup": round(fixing[1]["round_s"] / fixing[0]["round_s"], 1),
    }
    print(json.dumps({"fixing_round": fixing_summary}), flush=True)
    run = None if args.skip_run else default_run()
    if run is not None:
        print(json.dumps({"pwf_run": run}), flush=True)
    write_results(
        RESULTS,
        "gpu",
        rows,
        device=torch.cuda.get_device_name(),
        fixing_round=fixing_summary,
        pwf_run=run,
    )


if __name__ == "__main__":
    main()
