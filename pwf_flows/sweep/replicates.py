"""A trial's replicates: the same configuration under several seeds, and what they add up to.

A sweep with ``study.replicates: N`` runs every trial configuration N times (see
:class:`~pwf_core.config.schema.ReplicateConfig` for what a replicate varies). Each replicate is
a whole experiment, with its own checkpoints and MLflow run; with N > 1 the trial also gets an
MLflow run of its own, a child of the sweep's run and the parent of its replicates' runs, that
holds their aggregate (``final/<metric>`` the mean, ``.../std``, ``.../ci_low``,
``.../ci_high``, ``replicates/n``), so MLflow shows one row per trial and its replicates
beneath it. Optuna is told the replicates' means; their std, n and 95 % interval are the
trial's user attributes. A rerun runs only the replicates that did not finish: a finished one
answers from its stored result at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pwf_core._files import write_text_atomic
from pwf_core.config import ExperimentConfig, flatten_config
from pwf_flows.artifacts import setting_key
from pwf_flows.report.statistics import Summary, summarize_columns
from pwf_flows.sweep.spec import OBJECTIVES, SweepSpec
from pwf_flows.tracking import RunTracker


def _plain(value: float) -> float | None:
    return None if math.isnan(value) else value


def summary_attrs(name: str, summary: Summary) -> dict[str, Any]:
    """An objective's spread as Optuna user attributes (JSON: no NaN)."""
    return {
        f"{name}_std": _plain(summary.sd),
        f"{name}_n": summary.n,
        f"{name}_ci95": None if math.isnan(summary.low) else [summary.low, summary.high],
    }


def summary_metrics(key: str, summary: Summary) -> dict[str, float]:
    """A metric's replicates as MLflow metrics of the trial's run (the mean under ``key``)."""
    values = {key: summary.mean}
    if not math.isnan(summary.sd):
        values |= {f"{key}/std": summary.sd, f"{key}/ci_low": summary.low}
        values[f"{key}/ci_high"] = summary.high
    return values


def summarise(results: Sequence[Mapping[str, float]]) -> dict[str, Summary]:
    """Every metric all the replicates' final metrics share, summarised (mean, sd, n and the
    95 % Student-t interval: :func:`pwf_flows.report.statistics.summarize_columns`)."""
    if not results:
        return {}
    shared = sorted(set(results[0]).intersection(*results[1:]))
    return summarize_columns({key: [r[key] for r in results] for key in shared})


def objective_attrs(spec: SweepSpec, summaries: Mapping[str, Summary]) -> dict[str, Any]:
    """The trial's user attributes for each objective's spread (``accuracy_std`` ...)."""
    attrs: dict[str, Any] = {"replicates": 0}
    for name in spec.study.objectives:
        summary = summaries.get(OBJECTIVES[name].metric)
        if summary is not None:
            attrs |= summary_attrs(name, summary)
            attrs["replicates"] = summary.n
    return attrs


@dataclass
class TrialWork:
    """One trial under way: its replicates' configs, and what each returned.

    Args:
        number: The Optuna trial number.
        trial_id: Its id in the storage.
        params: Optuna's parameters.
        configs: One experiment config per replicate.
        run: The trial's MLflow run (with replicates; ``None`` for one replicate, whose own
            run is the trial's).
    """

    number: int
    trial_id: int
    params: dict[str, Any]
    configs: list[ExperimentConfig]
    run: TrialRun | None = None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.stopped is not None or len(self.results) == len(self.configs)

    def finished_results(self) -> list[dict[str, Any]]:
        return [self.results[r] for r in sorted(self.results)]


class TrialRun:
    """The MLflow run of a trial with replicates: their parent, and their aggregate.

    One run per configuration: a trial retried with the same parameters (a new number) reopens
    it, as its replicates reopen theirs.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def url(self) -> str:
        return self.tracker.url

    @classmethod
    def open(
        cls,
        spec: SweepSpec,
        parent_run_id: str,
        number: int,
        name: str,
        config: ExperimentConfig,
        folder: Path,
        tags: Mapping[str, str],
    ) -> TrialRun:
        """Create (or reopen) the trial's run under the sweep's run ``parent_run_id``."""
        setting = setting_key(config)
        record = folder / "trials" / f"{setting}.json"
        known = json.loads(record.read_text())["run_id"] if record.is_file() else None
        tracker = RunTracker.open(
            spec.name,
            name,
            {
                **tags,
                "kind": "trial",
                "setting": setting,
                "replicates": str(spec.study.replicates),
                "method": config.compression.method,
                "model": config.model.name,
                "dataset": config.data.name,
            },
            parent_run_id,
            known,
        )
        if tracker.run_id != known:
            write_text_atomic(record, json.dumps({"run_id": tracker.run_id}))
        params = {k: v for k, v in flatten_config(config).items() if not k.startswith("replicate.")}
        tracker.log_params(params | {"replicates": spec.study.replicates})
        return cls(tracker)

    def close(self, summaries: Mapping[str, Summary], stopped: Mapping[str, Any] | None) -> None:
        """Log the replicates' aggregate (or why the trial stopped early) and end the run."""
        metrics: dict[str, float] = {}
        for key, summary in summaries.items():
            metrics |= summary_metrics(f"final/{key}", summary)
        if summaries:
            metrics["replicates/n"] = float(next(iter(summaries.values())).n)
        self.tracker.log_metrics(metrics)
        if stopped is not None:
            self.tracker.set_tags(
                {
                    "early_stopped.round": str(stopped["round"]),
                    "early_stopped.by": ", ".join(map(str, stopped.get("by", []))),
                }
            )
        self.tracker.finish("FINISHED")

    def fail(self) -> None:
        self.tracker.finish("FAILED")
