"""The stored result of a finished experiment (read without Prefect, so ``pwf run`` can answer
"already complete" before starting a server)."""

from __future__ import annotations

import json
from typing import Any

from pwf_core.config import ExperimentConfig
from pwf_flows.artifacts import ExperimentFiles
from pwf_flows.links import run_url, served_prefect_url
from pwf_flows.tracking import find_run, tracking_uri


def finished_result(config: ExperimentConfig, files: ExperimentFiles) -> dict[str, Any] | None:
    """The result of a finished experiment whose MLflow run is intact, else ``None``."""
    if not (files.summary.is_file() and files.mlflow_run_id.is_file()):
        return None
    run = find_run(config.name, files.mlflow_run_id.read_text().strip())
    if run is None or run.info.status != "FINISHED":
        return None
    summary = json.loads(files.summary.read_text())
    return {
        "run_id": run.info.run_id,
        "experiment": config.name,
        "artifacts": str(files.root),
        "tracking_uri": tracking_uri(),
        "url": run_url(run.info.experiment_id, run.info.run_id),
        "prefect_url": served_prefect_url(run.data.tags.get("prefect.flow_run_url")),
        "metrics": summary["metrics"],
        "timing": {k: v for k, v in run.data.metrics.items() if k.startswith("time/")},
        "already_complete": True,
    }
