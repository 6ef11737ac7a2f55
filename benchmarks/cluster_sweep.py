"""The same 8-trial sweep through a Prefect server with one, then two, trial workers.

Starts on 127.0.0.1 a Prefect server, an MLflow tracking server (sqlite store, artifacts
served through its proxy), a `cpu` process worker for the sweep driver and N process workers
(``--limit 1`` each, as one per GPU) on the `gpu` pool; deploys this checkout's prefect.yaml
and runs ``prefect deployment run pwf/full-sweep`` with 8 trials of the default experiment
(digits, small CNN, two epochs between rounds) and ``max_parallel`` = N. The Optuna study is
a sqlite file every process reaches; each worker's trials get an equal share of the CPU
threads (``OMP_NUM_THREADS``); each worker count gets fresh studies, artifacts and
pretraining cache, so the two runs do the same work (NSGA-II's first generation is seeded
random sampling: both runs try the same 8 configurations).

Reported per worker count: the driver flow run's wall time, and per trial where the time
went: queued (flow run created until a worker picked it up: worker polling,
``PREFECT_WORKER_QUERY_SECONDS``), process start (a new Python process, the deployment's pull
step, importing torch, timm, MLflow and the flow), start-up (Prefect's flow engine until the
trial's MLflow run opened), compute (training, fixing, evaluation: the
``time/compute_s`` the trial logs), in-run orchestration (the rest of the MLflow run: task
runs, logging, checkpoints) and teardown. Writes ``benchmarks/results/cluster_sweep.json``.

Usage: ``python benchmarks/cluster_sweep.py [--workers 1 2] [--trials 8] [--query-seconds 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient
from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/cluster_sweep.py` puts only benchmarks/ on sys.path; the checkout goes
# first so that its tests package (the servers and workers the tests start, reused here) can be
# imported, and its own pwf_flows with it rather than another installed copy.
sys.path.insert(0, str(ROOT))

from tests._dummies.services import (  # noqa: E402 (needs the checkout on sys.path)
    Services,
    flow_run_id,
    free_port,
    mlflow_server_argv,
    prefect_server_argv,
)

RESULTS = Path(__file__).parent / "results" / "cluster_sweep.json"


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


@contextmanager
def cluster(workdir: Path, query_seconds: float) -> Iterator[Services]:
    """The servers, both work pools, this checkout's deployments and the driver's worker.

    Args:
        workdir: Where the servers keep their stores and every process its log.
        query_seconds: How often the workers poll for flow runs.

    Yields:
        The running services; all of them are stopped on exit.
    """
    prefect_port, mlflow_port = free_port(), free_port()
    stack = Services(
        workdir,
        env={
            "PREFECT_HOME": str(workdir / ".prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
            "PWF_PROJECT_DIR": str(ROOT),
        },
    )
    try:
        stack.start("prefect-server", prefect_server_argv(prefect_port))
        stack.start(
            "mlflow-server",
            mlflow_server_argv(
                mlflow_port,
                f"sqlite:///{workdir / 'mlflow.db'}",
                *("--serve-artifacts", "--artifacts-destination", str(workdir / "mlartifacts")),
            ),
        )
        stack.wait_http(f"{stack.env['PREFECT_API_URL']}/health", "the Prefect server", 180)
        stack.wait_http(f"{stack.env['MLFLOW_TRACKING_URI']}/health", "the MLflow server", 180)
        for pool in ("cpu", "gpu"):
            stack.run(["prefect", "work-pool", "create", pool, "--type", "process"])
        stack.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, timeout=900)
        stack.worker("worker-cpu", "cpu", 2)
        yield stack
    finally:
        stack.stop_all()


def sweep_with(stack: Services, workers: int, trials: int, threads: int) -> dict:
    """Run the sweep with ``workers`` trial workers; the per-trial breakdown of its time.

    Each worker's trials use ``threads`` CPU threads: workers sharing a host's cores without a
    thread budget oversubscribe them (two trials with two OpenMP threads each on two cores ran
    ten times slower here, spinning threads fighting for cores).
    """
    name = f"bench-{workers}-workers"
    started = [f"worker-gpu-{workers}-{i}" for i in range(workers)]
    for worker in started:
        stack.worker(worker, "gpu", 1, OMP_NUM_THREADS=str(threads))
    overrides = {
        "name": name,
        "study.n_trials": trials,
        "study.storage": f"sqlite:///{stack.workdir / name}.db",
        "execution.artifacts_dir": str(stack.workdir / name),
        "execution.max_parallel": workers,
    }
    output = stack.run(
        [
            *("prefect", "deployment", "run", "pwf/full-sweep"),
            *("--param", f"overrides={json.dumps(overrides)}"),
            *("--watch", "--watch-timeout", "1800"),
        ],
        timeout=1900,
    )
    driver = stack.prefect_api(f"flow_runs/{flow_run_id(output)}")
    if driver["state"]["type"] != "COMPLETED":
        raise RuntimeError(f"sweep {name} ended {driver['state']['type']}")
    for worker in started:
        stack.stop(worker)
    runs = [
        run
        for run in stack.prefect_api("flow_runs/filter", {"limit": 200})
        if (run.get("parameters") or {}).get("config", {}).get("name") == name
    ]
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(name)
    by_flow_run = {
        run.data.tags.get("prefect.flow_run_id"): run
        for run in client.search_runs([experiment.experiment_id])
    }
    phases: dict[str, list[float]] = {
        k: [] for k in ("queued", "process_start", "startup", "compute", "in_run", "teardown")
    }
    totals = []
    for run in runs:
        tracked = by_flow_run[run["id"]]
        opened = tracked.info.start_time / 1000
        closed = tracked.info.end_time / 1000
        flow_start = datetime.fromisoformat(run["start_time"]).timestamp()
        flow_end = datetime.fromisoformat(run["end_time"]).timestamp()
        compute = tracked.data.metrics["time/compute_s"]
        states = stack.prefect_api(f"flow_run_states/?flow_run_id={run['id']}")
        picked = min(s["timestamp"] for s in states if s["type"] == "PENDING")
        phases["queued"].append(seconds_between(run["created"], picked))
        phases["process_start"].append(seconds_between(picked, run["start_time"]))
        phases["startup"].append(opened - flow_start)
        phases["compute"].append(compute)
        phases["in_run"].append(closed - opened - compute)
        phases["teardown"].append(flow_end - closed)
        totals.append(seconds_between(run["created"], run["end_time"]))
    wall = seconds_between(driver["start_time"], driver["end_time"])
    compute_total = sum(phases["compute"])
    return {
        "workers": workers,
        "trials": len(runs),
        "driver_wall_s": round(wall, 1),
        "compute_s_total": round(compute_total, 1),
        "threads_per_trial": threads,
        "per_trial_median_s": {k: round(statistics.median(v), 2) for k, v in phases.items()},
        "per_trial_total_median_s": round(statistics.median(totals), 2),
        "overhead_per_trial_s": round(
            statistics.median(t - c for t, c in zip(totals, phases["compute"], strict=True)), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--query-seconds",
        type=float,
        default=10.0,
        help="how often workers poll for flow runs (Prefect's default: 10)",
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="pwf-cluster-bench-") as folder,
        cluster(Path(folder), args.query_seconds) as stack,
    ):
        rows = []
        for workers in args.workers:
            threads = max(1, (os.cpu_count() or 1) // workers)
            row = sweep_with(stack, workers, args.trials, threads)
            print(json.dumps(row), flush=True)
            rows.append(row)
    baseline = rows[0]["driver_wall_s"]
    for row in rows:
        row["wall_ratio_vs_first"] = round(row["driver_wall_s"] / baseline, 3)
    write_results(
        RESULTS,
        "cluster_sweep",
        rows,
        sweep="sweeps/full-sweep.yaml",
        query_seconds=args.query_seconds,
        cpus=os.cpu_count(),
    )


if __name__ == "__main__":
    main()
