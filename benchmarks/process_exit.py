"""What a quick end saves each pwf process (:mod:`pwf_flows.process_exit`).

Runs the same tiny ``pwf run`` (digits, MLflow in SQLite, a temporary Prefect server) through
``console_main``, as the ``pwf`` command starts (collect, then freeze at exit), and through the
bare ``main`` (the interpreter's usual last walks over every object), alternating, each in a
fresh folder. Each row: the wall seconds and the CPU seconds of the
process and its children (the temporary server included), and the seconds from the end of
``main`` to the process's end. Writes ``benchmarks/results/process_exit.json``.

Usage: ``python benchmarks/process_exit.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_results

RESULTS = Path(__file__).parent / "results" / "process_exit.json"
TINY = ["pretrain.epochs=2", "train.epochs=0.1", "compression.schedule=[0.5,1.0]"]
# Prints when main returned, so the teardown after it can be timed from outside.
_TIMED_MAIN = """
import sys, time
from pwf_flows.cli import {entry}
try:
    code = {entry}({args})
finally:
    print(f"main-returned {{time.time():.3f}}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def run_once(quick: bool, workdir: Path) -> dict:
    argv = ["run", "--no-progress", "--artifacts", str(workdir / "artifacts")]
    for item in TINY:
        argv += ["--set", item]
    entry, args = ("console_main", "") if quick else ("main", "sys.argv[1:]")
    code = _TIMED_MAIN.format(entry=entry, args=args)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns.db'}",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    returned = float(done.stderr.rsplit("main-returned ", 1)[1].split()[0])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": ended - started, "cpu_s": cpu, "after_main_s": ended - returned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    measured: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(repeats):
        for quick in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                measured[quick].append(run_once(quick, Path(folder)))
                print({"quick": quick, **measured[quick][-1]})
    rows = []
    for quick, label in ((False, "interpreter's usual end"), (True, "pwf: collect, then freeze")):
        row = {"exit": label}
        for key in ("wall_s", "cpu_s", "after_main_s"):
            row[key] = round(statistics.median(m[key] for m in measured[quick]), 2)
        rows.append(row)
    saved = {
        key: round(rows[0][key] - rows[1][key], 2) for key in ("wall_s", "cpu_s", "after_main_s")
    }
    write_results(RESULTS, "process_exit", rows, repeats=repeats, saved_per_process=saved)


if __name__ == "__main__":
    main()
