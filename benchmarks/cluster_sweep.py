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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient
from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "cluster_sweep.json"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


class Stack:
    """The servers and workers, each a process group of its own, logs in the work folder."""

    def __init__(self, workdir: Path, query_seconds: float) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        prefect_port, mlflow_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{prefect_port}/api"
        self.mlflow = f"http://127.0.0.1:{mlflow_port}"
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "PREFECT_HOME": str(workdir / ".prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_TRACKING_URI": self.mlflow,
            "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
            "PWF_PROJECT_DIR": str(ROOT),
        }
        self.start("prefect-server", ["prefect", "server", "start", "--port", str(prefect_port)])
        self.start(
            "mlflow-server",
            [
                *("mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port)),
                *("--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}"),
                *("--serve-artifacts", "--artifacts-destination", str(workdir / "mlartifacts")),
            ],
        )
        self.wait_for(lambda: healthy(f"{self.api}/health"), "the Prefect server")
        self.wait_for(lambda: healthy(f"{self.mlflow}/health"), "the MLflow server")
        for pool in ("cpu", "gpu"):
            self.run(["prefect", "work-pool", "create", pool, "--type", "process"])
        self.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT)
        self.start("worker-cpu", ["prefect", "worker", "start", "--pool", "cpu", "--limit", "2"])

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("a")
        process = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float = 900) -> str:
        done = subprocess.run(
            argv,
            cwd=cwd or self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout + done.stderr

    def wait_for(self, condition, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def api_call(self, endpoint: str, body: dict | None = None) -> list | dict:
        request = urllib.request.Request(
            f"{self.api}/{endpoint}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def sweep_with(stack: Stack, workers: int, trials: int, threads: int) -> dict:
    """Run the sweep with ``workers`` trial workers; the per-trial breakdown of its time.

    Each worker's trials use ``threads`` CPU threads: workers sharing a host's cores without a
    thread budget oversubscribe them (two trials with two OpenMP threads each on two cores ran
    ten times slower here, spinning threads fighting for cores).
    """
    name = f"bench-{workers}-workers"
    started = [
        stack.start(
            f"worker-gpu-{workers}-{i}",
            ["prefect", "worker", "start", "--pool", "gpu", "--limit", "1"],
            OMP_NUM_THREADS=str(threads),
        )
        for i in range(workers)
    ]
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
    driver_id = next(line.split()[-1] for line in output.splitlines() if "UUID" in line)
    driver = stack.api_call(f"flow_runs/{driver_id}")
    if driver["state"]["type"] != "COMPLETED":
        raise RuntimeError(f"sweep {name} ended {driver['state']['type']}")
    for process in started:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    runs = [
        run
        for run in stack.api_call("flow_runs/filter", {"limit": 200})
        if (run.get("parameters") or {}).get("config", {}).get("name") == name
    ]
    client = MlflowClient(stack.mlflow)
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
        states = stack.api_call(f"flow_run_states/?flow_run_id={run['id']}")
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
    with tempfile.TemporaryDirectory(prefix="pwf-cluster-bench-") as folder:
        stack = Stack(Path(folder), args.query_seconds)
        try:
            rows = []
            for workers in args.workers:
                threads = max(1, (os.cpu_count() or 1) // workers)
                row = sweep_with(stack, workers, args.trials, threads)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            stack.stop()
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
