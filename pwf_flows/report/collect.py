"""Which runs a report covers, and what it reads of each: MLflow is the only source.

A selection names experiments (every finished experiment run in them), a sweep (its trials:
the children of its parent run) or run ids; each run becomes a :class:`ReportRun` holding its
final metrics under the keys every method shares, its knobs, its pretrained model's accuracy
and its links (the MLflow run, the Prefect flow run).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pwf_core.config import flatten_config
from pwf_core.errors import ConfigError
from pwf_core.registry import config_class
from pwf_flows.links import run_url, served_prefect_url

FINAL = "final/"
PARENT_TAG = "mlflow.parentRunId"
SEARCH_PAGE = 1000


class ReportError(ConfigError):
    """A report that cannot be made: what it was asked for is not there, or cannot be read."""


@dataclass(frozen=True)
class Selection:
    """What a report covers.

    Args:
        experiments: MLflow experiments, every finished run in them (sweep parents aside).
        sweep: A sweep's name (its MLflow experiment): the trials under its parent run.
        run_ids: Single runs.
        one_panel: Put every run in one panel (they must share a dataset).
    """

    experiments: tuple[str, ...] = ()
    sweep: str | None = None
    run_ids: tuple[str, ...] = ()
    one_panel: bool = False

    def __post_init__(self) -> None:
        if not (self.experiments or self.sweep or self.run_ids):
            raise ReportError("name what to report on: --experiment, --sweep or --run")


@dataclass(frozen=True)
class ReportRun:
    """One run as a report shows it."""

    run_id: str
    experiment_id: str
    name: str
    method: str
    model: str
    dataset: str
    knobs: dict[str, str]
    metrics: dict[str, float]
    pretrained_acc: float | None
    url: str
    prefect_url: str | None
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def panel(self) -> str:
        """The model and dataset: runs of one panel are compared with each other."""
        return f"{self.model} on {self.dataset}"

    def metric(self, key: str) -> float | None:
        return self.metrics.get(key)


def _experiment(client: MlflowClient, name: str) -> Any:
    found = client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment '{name}'; there are: {', '.join(known) or 'none'}")
    return found


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, max_results=SEARCH_PAGE, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def select_runs(client: MlflowClient, selection: Selection) -> list[Run]:
    """The finished experiment runs a selection names, in a stable order.

    Raises:
        ReportError: for an unknown experiment, sweep or run id, or an empty selection.
    """
    runs: dict[str, Run] = {}
    for name in selection.experiments:
        experiment = _experiment(client, name)
        for run in _search(client, [experiment.experiment_id], "attributes.status = 'FINISHED'"):
            if run.data.tags.get("kind") != "sweep":
                runs[run.info.run_id] = run
    if selection.sweep is not None:
        experiment = _experiment(client, selection.sweep)
        parents = _search(client, [experiment.experiment_id], "tags.kind = 'sweep'")
        if not parents:
            raise ReportError(f"MLflow experiment '{selection.sweep}' holds no sweep")
        for parent in parents:
            trials = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
            for run in _search(client, [experiment.experiment_id], trials):
                if run.info.status == "FINISHED":
                    runs[run.info.run_id] = run
    for run_id in selection.run_ids:
        try:
            runs[run_id] = client.get_run(run_id)
        except MlflowException:
            raise ReportError(f"no MLflow run '{run_id}'") from None
    finished = [run for run in runs.values() if f"{FINAL}cls/acc" in run.data.metrics]
    if not finished:
        raise ReportError("the selection holds no finished experiment run to report on")
    return sorted(finished, key=lambda run: (run.info.start_time or 0, run.info.run_id))


def _defaults(method: str) -> dict[str, str]:
    """A method's knobs at their defaults, as MLflow holds params (strings)."""
    try:
        defaults = config_class(method)()
    except ValueError:  # a method this installation does not know
        return {}
    return {key: str(value) for key, value in flatten_config(defaults).items()}


def _knobs(params: dict[str, str], method: str) -> dict[str, str]:
    """The method's knobs the run set away from their defaults (what tells it apart)."""
    defaults = _defaults(method)
    return {
        key.removeprefix("compression."): value
        for key, value in sorted(params.items())
        if key.startswith("compression.")
        and key != "compression.method"
        and defaults.get(key.removeprefix("compression.")) != value
    }


def report_run(run: Run, tracking_uri: str | None = None) -> ReportRun:
    """What a report reads of one MLflow run.

    Args:
        run: The run.
        tracking_uri: Its store, for the run's link (default: ``MLFLOW_TRACKING_URI``).
    """
    data, info = run.data, run.info
    metrics = {
        key.removeprefix(FINAL): value
        for key, value in data.metrics.items()
        if key.startswith(FINAL)
    }
    method = data.tags.get("method", data.params.get("compression.method", "?"))
    return ReportRun(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        name=info.run_name or info.run_id,
        method=method,
        model=data.tags.get("model", data.params.get("model.name", "?")),
        dataset=data.tags.get("dataset", data.params.get("data.name", "?")),
        knobs=_knobs(data.params, method),
        metrics=metrics,
        pretrained_acc=data.metrics.get("pretrain/test_acc"),
        url=run_url(info.experiment_id, info.run_id, tracking_uri),
        prefect_url=served_prefect_url(data.tags.get("prefect.flow_run_url")),
        tags=dict(data.tags),
    )


def reliability_bins(client: MlflowClient, run: ReportRun) -> dict[str, list[float]] | None:
    """The run's reliability bins (``tables/reliability.json``), when it logged them."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.run_id, "tables/reliability.json", folder)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def panels(runs: Iterable[ReportRun], one_panel: bool) -> dict[str, list[ReportRun]]:
    """Runs grouped by model and dataset (or all in one panel).

    Raises:
        ReportError: when one panel is asked for runs of different datasets.
    """
    runs = list(runs)
    if one_panel:
        datasets = sorted({run.dataset for run in runs})
        if len(datasets) > 1:
            raise ReportError(
                f"runs of different datasets ({', '.join(datasets)}) cannot share one panel: "
                "their accuracies are not comparable; leave out --one-panel"
            )
        models = sorted({run.model for run in runs})
        return {f"{', '.join(models)} on {datasets[0]}": runs}
    grouped: dict[str, list[ReportRun]] = {}
    for run in runs:
        grouped.setdefault(run.panel, []).append(run)
    return grouped
