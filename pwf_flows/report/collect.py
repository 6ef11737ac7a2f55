"""Which runs a report covers, and what it reads of each: MLflow is the only source.

A selection names experiments (every finished experiment run in them), a sweep (its
experiment runs: the children of its parent run, or the grandchildren where a trial's
replicates sit under a trial run) or run ids; each run becomes a :class:`ReportRun` holding its
final metrics under the keys every method shares, its size knobs as the run resolved them,
which setting and replicate it is, its pretrained model's accuracy and its links (the MLflow
run, the Prefect flow run).

What a run carries (written by the experiment flow): tags ``kind`` (``experiment``; sweeps'
``sweep`` and ``trial`` runs are aggregates and left out), ``method``, ``model``, ``dataset``,
``setting`` (shared by the replicates of one config), ``replicate``; params ``seed``,
``replicate.index``, ``knob.<name>`` (older runs: ``compression.<name>``); metrics
``final/*`` and ``pretrain/test_acc``.
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
from pwf_core.registry import config_class, method_class
from pwf_flows.links import run_url, served_prefect_url

FINAL = "final/"
PARENT_TAG = "mlflow.parentRunId"
SEARCH_PAGE = 1000
KNOB = "knob."
AGGREGATES = ("sweep", "trial")  # kinds of run that summarise others: never a report's row


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
    setting: str = ""
    seed: str = ""
    replicate: int = 0
    start_time: int = 0
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def panel(self) -> str:
        """The model and dataset: runs of one panel are compared with each other."""
        return f"{self.model} on {self.dataset}"

    @property
    def pair(self) -> tuple[str, str, str, int]:
        """What pairs replicates across methods: replicate ``r`` of every method on the same
        base seed shares the pretrained model and the compression seed."""
        return (self.dataset, self.model, self.seed, self.replicate)

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


def _descendants(runs: list[Run], roots: set[str]) -> list[Run]:
    """The runs below ``roots`` in MLflow's parent links, at any depth."""
    children: dict[str, list[Run]] = {}
    for run in runs:
        children.setdefault(run.data.tags.get(PARENT_TAG, ""), []).append(run)
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.info.run_id)
    return found


def select_runs(client: MlflowClient, selection: Selection) -> list[Run]:
    """The finished experiment runs a selection names, in a stable order (sweeps' and trials'
    aggregate runs left out).

    Raises:
        ReportError: for an unknown experiment, sweep or run id, or an empty selection.
    """
    runs: dict[str, Run] = {}
    finished = "attributes.status = 'FINISHED'"
    for name in selection.experiments:
        experiment = _experiment(client, name)
        for run in _search(client, [experiment.experiment_id], finished):
            runs[run.info.run_id] = run
    if selection.sweep is not None:
        experiment = _experiment(client, selection.sweep)
        every = _search(client, [experiment.experiment_id], "")
        parents = {run.info.run_id for run in every if run.data.tags.get("kind") == "sweep"}
        if not parents:
            raise ReportError(f"MLflow experiment '{selection.sweep}' holds no sweep")
        for run in _descendants(every, parents):
            if run.info.status == "FINISHED":
                runs[run.info.run_id] = run
    for run_id in selection.run_ids:
        try:
            runs[run_id] = client.get_run(run_id)
        except MlflowException:
            raise ReportError(f"no MLflow run '{run_id}'") from None
    kept = [
        run
        for run in runs.values()
        if f"{FINAL}cls/acc" in run.data.metrics and run.data.tags.get("kind") not in AGGREGATES
    ]
    if not kept:
        raise ReportError("the selection holds no finished experiment run to report on")
    return sorted(kept, key=lambda run: (run.info.start_time or 0, run.info.run_id))


def _method_config(method: str) -> Any:
    try:
        return config_class(method)()
    except ValueError:  # a method this installation does not know
        return None


def _knobs(params: dict[str, str], method: str) -> dict[str, str]:
    """The size knobs as the run resolved them (``knob.*``: ``b=5`` where the config said
    ``auto``). A run of an older pwf recorded none: its method's size-knob fields as the config
    gave them, else the knobs it set away from their defaults."""
    resolved = {k.removeprefix(KNOB): v for k, v in params.items() if k.startswith(KNOB)}
    if resolved:
        return dict(sorted(resolved.items()))
    config = _method_config(method)
    if config is None:
        return {}
    fields = method_class(config).size_knob_fields
    named = {f: params[f"compression.{f}"] for f in fields if f"compression.{f}" in params}
    if named:
        return named
    defaults = {key: str(value) for key, value in flatten_config(config).items()}
    return {
        key.removeprefix("compression."): value
        for key, value in sorted(params.items())
        if key.startswith("compression.")
        and key != "compression.method"
        and defaults.get(key.removeprefix("compression.")) != value
    }


def _replicate(data: Any) -> int:
    value = data.params.get("replicate.index", data.tags.get("replicate", "0"))
    try:
        return int(value)
    except ValueError:
        return 0


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
        # older runs carry no setting: their run key, else the run alone, is theirs
        setting=data.tags.get("setting") or data.tags.get("run_key") or info.run_id,
        seed=data.params.get("seed", ""),
        replicate=_replicate(data),
        start_time=info.start_time or 0,
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
