"""How long ``pwf run`` takes to stop after a signal, its MLflow run closed (bar: 10 s).

Runs the default experiment (digits, temporary Prefect server, MLflow in SQLite) with a long
pretraining, and once it trains sends: SIGTERM to the command's whole process group and to the
temporary Prefect server (what a batch scheduler or ``systemctl stop`` does to every process
of a job), SIGTERM to the command alone, and SIGINT (Ctrl-C). Each row: the seconds from the
signal to the command's exit, its exit code and the MLflow run's status. Writes
``benchmarks/results/shutdown.json``.

Usage: ``python benchmarks/shutdown.py``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from results_file import write_results

# Run from the repository root, a script has only benchmarks/ on its path: the root goes first,
# for the test services that start and watch processes.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests._dummies.services import temporary_server, wait_until

RESULTS = Path(__file__).parent / "results" / "shutdown.json"
CASES = {
    "SIGTERM to the process group and the Prefect server": "group",
    "SIGTERM to pwf alone": "alone",
    "SIGINT (Ctrl-C)": "interrupt",
}


def stop_once(how: str, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns.db'}",
    }
    command = [sys.executable, "-m", "pwf_flows.cli", "run", "--no-progress"]
    command += ["--set", "pretrain.epochs=500", "--set", f"name=shutdown-{how}"]
    with (workdir / f"{how}.log").open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started_run = lambda: any((workdir / "artifacts").rglob("run.owner"))  # noqa: E731
    wait_until(started_run, "the run to start", timeout=300, processes=[process])
    time.sleep(5)  # well inside pretraining
    started = time.monotonic()
    if how == "group":
        server = temporary_server(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        server.send_signal(signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM if how == "alone" else signal.SIGINT)
    process.wait(timeout=300)
    seconds = time.monotonic() - started
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(f"shutdown-{how}")
    (run,) = client.search_runs([experiment.experiment_id])
    return {
        "exit_code": process.returncode,
        "seconds": round(seconds, 2),
        "status": run.info.status,
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, how in CASES.items():
            row = {"case": label, **stop_once(how, Path(folder))}
            print(row)
            rows.append(row)
    write_results(RESULTS, "shutdown", rows, bar_s=10)


if __name__ == "__main__":
    main()
