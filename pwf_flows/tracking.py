"""The one place that talks to MLflow.

Runs are driven through ``MlflowClient`` with explicit run ids (no global "active run"), so a
resumed experiment reopens its own run, and sweep trials are nested under their sweep's run by
the ``mlflow.parentRunId`` tag.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pwf_core.config import ExperimentConfig

MAX_BATCH = 900  # MLflow accepts at most 1000 entities per log_batch call


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def git_commit(cwd: Path | None = None) -> str:
    """The checkout's commit, or ``unknown`` outside a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the MLflow experiment ``name``, created when missing (safe against races)."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


class RunTracker:
    """Logs one MLflow run: params, tags, metrics with steps, artifacts, final status.

    Args:
        run_id: The run.
        client: Client bound to the tracking URI.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> RunTracker:
        """Reopen ``resume_run_id`` when it exists in the store, else create a new run."""
        client = MlflowClient()
        if resume_run_id:
            try:
                client.get_run(resume_run_id)
            except MlflowException:
                resume_run_id = None
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            tracker = cls(resume_run_id, client)
        else:
            all_tags = {"mlflow.runName": run_name, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(experiment_id(client, experiment), tags=all_tags)
            tracker = cls(run.info.run_id, client)
        return tracker

    @property
    def resumed_params(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.params

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters not yet logged (MLflow params are write-once)."""
        present = self.resumed_params
        entries = [Param(k, str(v)) for k, v in params.items() if k not in present]
        for start in range(0, len(entries), MAX_BATCH):
            self.client.log_batch(self.run_id, params=entries[start : start + MAX_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(entries), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start : start + MAX_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` or ``FAILED`` (what was logged stays)."""
        self.client.set_terminated(self.run_id, status=status)


def experiment_tags(config: ExperimentConfig) -> dict[str, str]:
    """Tags every experiment run carries."""
    return {
        "method": config.fixing.method,
        "model": config.model.name,
        "dataset": config.data.name,
        "git_commit": git_commit(),
    }
