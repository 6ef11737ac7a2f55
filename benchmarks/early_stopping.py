"""What early stopping saves on the shipped full-sweep, and what it costs the front.

Runs ``sweeps/full-sweep.yaml`` (NSGA-II on digits, seeded) twice in one go, with the shipped
early-stopping rule and without it, each in a fresh study and artifacts folder (one shared
pretraining cache, so neither pays for it), then compares:

- total trial compute (``sweep/compute_s``: training, fixing and evaluation of every trial,
  stopped ones included) with / without: bar <= 0.70;
- the hypervolume of each sweep's final front of complete trials (top-1 up, unique values
  down), normalised on the same reference point: bar >= 0.98 x without;
- the replay of the rule on the sweep run without it: no Pareto-optimal trial lost.

Both sweeps ask the same configurations (the sampler is seeded, and NSGA-II's first
generation is larger than the sweep), so the difference is the rule's alone. The hypervolume
comes from moocore (a dev dependency). Writes ``benchmarks/results/early_stopping.json``.

Usage: ``python benchmarks/early_stopping.py [--trials 24]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import moocore
import numpy as np
import optuna
from optuna.trial import TrialState
from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "full-sweep.yaml"
RESULTS = Path(__file__).parent / "results" / "early_stopping.json"
sys.path.insert(0, str(ROOT))

from pwf_flows.sweep.early_stopping import Rule, replay  # noqa: E402
from pwf_flows.sweep.spec import load_sweep  # noqa: E402


def run_sweep(name: str, workdir: Path, trials: int, early_stopping: bool) -> dict:
    """``pwf sweep`` of the shipped full-sweep to its end; its parent run's metrics."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    command = [sys.executable, "-m", "pwf_flows.cli", "sweep", str(SWEEP), "--no-progress"]
    for key, value in {
        "name": name,
        "study.n_trials": trials,
        "study.storage": storage,
        "execution.artifacts_dir": str(workdir / "artifacts"),
    }.items():
        command += ["--set", f"{key}={value}"]
    if not early_stopping:
        command += ["--set", "study.early_stopping=null"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(
            f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(name).experiment_id], "tags.kind = 'sweep'"
    )
    study = optuna.load_study(study_name=name, storage=storage)
    return {
        "study": study,
        "wall_s": time.perf_counter() - started,
        "metrics": parent.data.metrics,
    }


def warm_pretraining(workdir: Path) -> None:
    """Pretrain once into the shared cache, so that neither sweep's first trial pays for it."""
    command = [sys.executable, "-m", "pwf_flows.cli", "run", "--no-progress", "--set", "name=warm"]
    command += ["--set", "train.epochs=0", "--set", "compression.schedule=[1.0]"]
    command += ["--artifacts", str(workdir / "artifacts")]
    subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=True)


def front(study: optuna.Study) -> np.ndarray:
    """The complete trials' (1 - top-1, unique values): both minimised."""
    points = [
        (1.0 - t.values[0], t.values[1]) for t in study.get_trials(states=(TrialState.COMPLETE,))
    ]
    return np.asarray(points, dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pwf-es-") as folder:
        workdir = Path(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns.db'}"
        os.environ["PREFECT_HOME"] = str(workdir / ".prefect")
        warm_pretraining(workdir)
        off = run_sweep("es-off", workdir, args.trials, early_stopping=False)
        on = run_sweep("es-on", workdir, args.trials, early_stopping=True)
        points_off, points_on = front(off["study"]), front(on["study"])
        # One reference point for both: a little worse than the worst of either sweep.
        worst = np.vstack([points_off, points_on]).max(axis=0)
        best = np.vstack([points_off, points_on]).min(axis=0)
        scale = np.where(worst > best, worst - best, 1.0)
        reference = np.full(2, 1.1)
        hv_off = moocore.hypervolume((points_off - best) / scale, ref=reference)
        hv_on = moocore.hypervolume((points_on - best) / scale, ref=reference)
        spec = load_sweep(SWEEP)
        replayed = replay(off["study"], Rule(spec.study.early_stopping, spec.study.objectives))
        compute_off = off["metrics"]["sweep/compute_s"]
        compute_on = on["metrics"]["sweep/compute_s"]
        stopped = [
            t.number
            for t in on["study"].get_trials(states=(TrialState.PRUNED,))
            if "early_stopped" in t.user_attrs
        ]
        row = {
            "trials": args.trials,
            "rule": spec.study.early_stopping.model_dump(),
            "compute_s_without": compute_off,
            "compute_s_with": compute_on,
            "compute_ratio": compute_on / compute_off,
            "compute_ratio_bar": 0.70,
            "hypervolume_without": hv_off,
            "hypervolume_with": hv_on,
            "hypervolume_ratio": hv_on / hv_off,
            "hypervolume_ratio_bar": 0.98,
            "stopped_trials": stopped,
            "complete_with": len(points_on),
            "complete_without": len(points_off),
            "replay_stopped": {str(k): v[0] for k, v in replayed.stopped.items()},
            "replay_saved_share": replayed.saved_share,
            "replay_lost_pareto": replayed.lost_pareto,
            "wall_s_without": off["wall_s"],
            "wall_s_with": on["wall_s"],
        }
        print(json.dumps(row, indent=2))
        write_results(RESULTS, "early_stopping", [row], sweep=str(SWEEP.relative_to(ROOT)))


if __name__ == "__main__":
    main()
