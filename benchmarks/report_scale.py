"""How long ``pwf report`` takes over many runs (bar: 200 runs in 30 s).

Generates N finished runs (four methods, their knobs varied, three replicates per setting,
each with the final metrics, params and tags a pwf run logs, and reliability bins as an
artifact) in a real MLflow SQLite store, then times the report of the whole experiment:
selection, reading, statistics (intervals, paired tests at every budget), figures, page and
tables, written. Writes ``benchmarks/results/report_scale.json``.

Usage: ``python benchmarks/report_scale.py [--runs N]``
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from results_file import write_results

from pwf_core.config import flatten_config
from pwf_core.registry import config_class
from pwf_flows.report import Selection, build_report, write_report

RESULTS = Path(__file__).parent / "results" / "report_scale.json"
KNOB = {"pwfn": "b", "wfn": "delta", "kmeans": "clusters", "uniform": "bits"}
REPLICATES = 3
TEST_SAMPLES = 359


def _bins(rng: random.Random) -> dict[str, list[float]]:
    lower = [i / 15 for i in range(15)]
    confidence = [x + 1 / 30 for x in lower]
    return {
        "lower": lower,
        "upper": [x + 1 / 15 for x in lower],
        "confidence": confidence,
        "accuracy": [min(1.0, c + rng.uniform(-0.1, 0.1)) for c in confidence],
        "count": [rng.randint(0, 40) for _ in lower],
    }


def generate(client: MlflowClient, experiment: str, runs: int, folder: Path) -> None:
    """``runs`` finished runs like pwf's: settings of four methods, three replicates each."""
    rng = random.Random(0)
    eid = client.create_experiment(experiment)
    now = int(time.time() * 1000)
    bins = folder / "reliability.json"
    for index in range(runs):
        number, replicate = divmod(index, REPLICATES)
        method = list(KNOB)[number % 4]
        if replicate == 0:
            config = config_class(method)()
            params = {f"compression.{k}": v for k, v in flatten_config(config).items()}
            knob = str(rng.randint(2, 64))
            unique = float(rng.randint(8, 400))
            accuracy = rng.uniform(0.9, 0.99)
        metrics = {
            "cls/acc": accuracy + rng.randint(-3, 3) / TEST_SAMPLES,
            "ws/unique_values": unique + rng.randint(-2, 2),
            "ws/shared_values": unique,
            "ws/outliers": 0.0,
            "ws/entropy_bits": rng.uniform(1, 6),
            "size/file_bytes": rng.uniform(5e4, 7e4),
            "size/compression_ratio": rng.uniform(3, 4),
            "cal/ece": rng.uniform(0.005, 0.05),
            "cls/nll": rng.uniform(0.03, 0.3),
            "data/test_samples": float(TEST_SAMPLES),
        }
        run = client.create_run(
            eid,
            run_name=f"{method} {KNOB[method]}={knob} r{replicate}",
            tags={
                "kind": "experiment",
                "method": method,
                "model": "small_cnn",
                "dataset": "digits",
                "setting": f"setting-{number}",
                "replicate": str(replicate),
            },
        )
        entries = [Metric(f"final/{k}", v, now, 0) for k, v in metrics.items()]
        entries.append(Metric("pretrain/test_acc", 0.99, now, 0))
        logged = {**params, "seed": "0", "replicate.index": str(replicate)}
        logged[f"knob.{KNOB[method]}"] = knob
        client.log_batch(
            run.info.run_id,
            metrics=entries,
            params=[Param(k, str(v)) for k, v in logged.items()],
            tags=[RunTag("mlflow.runName", run.info.run_name)],
        )
        bins.write_text(json.dumps(_bins(rng)))
        client.log_artifact(run.info.run_id, str(bins), "tables")
        client.set_terminated(run.info.run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        client = MlflowClient(f"sqlite:///{store / 'mlruns.db'}")
        started = time.perf_counter()
        generate(client, "scale", args.runs, store)
        generated = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        report = build_report(client, Selection(experiments=("scale",)), "scale", "benchmark")
        write_report(report, store / "report")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        size = (store / "report" / "report.html").stat().st_size
    row = {
        "runs": len(report.runs),
        "settings": sum(len(group) for group in report.settings.values()),
        "report_s": round(seconds, 2),
        "report_cpu_s": round(cpu, 2),  # wall above CPU: other work on the machine
        "page_bytes": size,
        "generate_s": round(generated, 1),
    }
    print(row)
    write_results(RESULTS, "report_scale", [row], bar_s=30)


if __name__ == "__main__":
    main()
