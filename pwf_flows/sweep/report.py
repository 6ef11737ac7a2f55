"""What a sweep leaves: the trials table, the Pareto front, parameter importances and summary
metrics on its parent MLflow run."""

from __future__ import annotations

import base64
import math
import re
import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from pwf_core._files import atomic_path
from pwf_core.errors import ConfigError
from pwf_flows.plots import bar_chart, pareto_front
from pwf_flows.report import Report, ReportError, Selection, build_report, write_report
from pwf_flows.report.table import FIELDS
from pwf_flows.sweep.early_stopping import Rule, replay
from pwf_flows.sweep.spec import OBJECTIVES, EarlyStoppingSpec, SweepSpec, masked_url
from pwf_flows.sweep.study import REPORTED, trials_in
from pwf_flows.tracking import RunTracker

MIN_IMPORTANCE_TRIALS = 5
DROP_TOLERANCE = 0.01  # "smallest unique count at <= 1 point drop"


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial: parameters, accuracy, unique values, Pareto membership."""
    front = (
        {t.number for t in study.best_trials} if trials_in(study, TrialState.COMPLETE) else set()
    )
    rows = [
        {
            "trial": t.number,
            **{f"param.{k}": v for k, v in t.params.items()},
            **{name: t.user_attrs.get(name) for name in REPORTED},
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "pareto": t.number in front,
        }
        for t in trials_in(study, TrialState.COMPLETE)
    ]
    table = pd.DataFrame(rows)
    for column in table.columns:
        # A choice of mixed kinds ([1000, auto, 6000]) is a column of text: Parquet holds one
        # type per column.
        if table[column].dtype == object and table[column].map(type).nunique() > 1:
            table[column] = table[column].astype(str)
    return table


def summary_metrics(study: optuna.Study, table: pd.DataFrame) -> dict[str, float]:
    """Best top-1, the smallest unique count within one point of the reference accuracy, and
    the size of the Pareto front (the reference: the pretrained model's top-1 when trials
    recorded it, else the best trial's)."""
    if table.empty:
        return {"sweep/complete_trials": 0.0}
    references = [
        t.user_attrs["pretrained_accuracy"]
        for t in trials_in(study, TrialState.COMPLETE)
        if t.user_attrs.get("pretrained_accuracy") is not None
    ]
    reference = max(references) if references else float(table["accuracy"].max())
    close = table[table["accuracy"] >= reference - DROP_TOLERANCE]
    return {
        "sweep/complete_trials": float(len(table)),
        "sweep/best_accuracy": float(table["accuracy"].max()),
        "sweep/reference_accuracy": float(reference),
        "sweep/min_unique_values_within_1pt": (
            float(close["unique_values"].min()) if not close.empty else math.nan
        ),
        "sweep/pareto_size": float(table["pareto"].sum()),
    }


def importances(study: optuna.Study, spec: SweepSpec) -> dict[str, dict[str, float]]:
    """Parameter importances per objective, for the direction it is optimised in.

    Optuna's evaluator ranks what leads to *low* values, so maximised objectives are negated.
    With fewer than :data:`MIN_IMPORTANCE_TRIALS` complete trials there is nothing to rank.
    """
    complete = trials_in(study, TrialState.COMPLETE)
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}
    found = {}
    for index, name in enumerate(spec.study.objectives):
        sign = -1.0 if OBJECTIVES[name].direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                found[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=index, s=sign: s * t.values[i]
                )
        except (RuntimeError, ValueError, ZeroDivisionError) as err:
            get_run_logger().info("no parameter importances for %s: %s", name, err)
    return found


def method_label(spec: SweepSpec) -> str:
    """The method a sweep tunes, or "several methods" when the space swaps the section."""
    methods = {
        spec.trial_config(
            {key: label for key, label in zip(spec.space, labels, strict=True)}
        ).compression.method
        for labels in zip(*(dim.probe_labels() for dim in spec.space.values()), strict=False)
    }
    return methods.pop() if len(methods) == 1 else "several methods"


def report_sweep(
    study: optuna.Study, spec: SweepSpec, parent: RunTracker, folder: Path
) -> pd.DataFrame:
    """Log the trials table, the front, the importances and the summary to ``parent``."""
    logger = get_run_logger()
    table = trials_table(study)
    tables = folder / "trials.parquet"
    with atomic_path(tables) as tmp:
        table.to_parquet(tmp, index=False)
    parent.log_artifact(tables, "tables")
    summary = summary_metrics(study, table)
    if not table.empty:
        title = f"{spec.name}: {len(table)} trials ({method_label(spec)})"
        objectives = spec.study.objectives
        cost = objectives[1] if objectives[0] == "accuracy" and len(objectives) > 1 else None
        plot = pareto_front(
            table,
            folder / "pareto_front.png",
            title,
            summary.get("sweep/reference_accuracy"),
            cost=cost if cost in table else "unique_values",
            cost_label=OBJECTIVES[cost].label if cost in table else "unique values",
        )
        parent.log_artifact(plot, "plots")
    found = importances(study, spec)
    if not found:
        logger.info(
            "parameter importances skipped: %d complete trials, at least %d needed",
            len(table),
            MIN_IMPORTANCE_TRIALS,
        )
    for name, values in found.items():
        objective = OBJECTIVES[name]
        better = "higher" if objective.direction == "maximize" else "lower"
        path = bar_chart(
            values,
            folder / f"importance_{name}.png",
            f"what drives {objective.label} ({better} is better)\n"
            f"{spec.name}, {method_label(spec)}, {len(table)} trials",
            "importance (PED-ANOVA, normalised)",
        )
        parent.log_artifact(path, "plots")
    parent.log_latest(summary)  # a continued sweep's summary at a step of its own
    if not table.empty:
        publish_comparison(spec, parent, folder)
    return table


def publish_comparison(spec: SweepSpec, parent: RunTracker, folder: Path) -> None:
    """The sweep's trials compared (``pwf report`` of the sweep) on its parent MLflow run, and
    its table and front as artifacts of the sweep's Prefect flow run."""

    def built(reference: str | None) -> Report:
        return build_report(
            parent.client,
            Selection(sweep=spec.name),
            f"{spec.name}: the trials compared",
            "MLflow",
            reference=reference,
            budgets=spec.report.budgets,
        )

    try:
        report = built(spec.report.reference)
    except ReportError as error:
        if spec.report.reference is None:
            raise
        # A sweep cut short (--n-trials, a budget) may not have run its reference yet: its
        # report still compares what did run, and says so.
        get_run_logger().warning("%s: compared with the first method instead", error)
        report = built(None)
    for path in write_report(report, folder / "report").values():
        parent.log_artifact(path, "report")
    if not flow_run.id:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:40]
    create_table_artifact(
        [
            {"method": run.method, "run": run.name, "mlflow_url": run.url}
            | {field.header: field.cell(run) for field in FIELDS}
            for run in report.runs
        ],
        key=f"sweep-{key}-table",
        description=f"{spec.name}: every trial, as pwf report tabulates it",
    )
    front = base64.b64encode(report.front_png).decode()
    create_markdown_artifact(
        f"### {spec.name}: the trials compared\n\n"
        f"MLflow parent run: [{parent.run_id}]({parent.url}) (report.html under report/)\n\n"
        f"![accuracy against unique values](data:image/png;base64,{front})\n\n" + report.markdown,
        key=f"sweep-{key}-front",
        description=f"{spec.name}: accuracy against unique values, one series per method",
    )


def pareto_report(spec: SweepSpec) -> pd.DataFrame | None:
    """The study's complete trials with the Pareto front marked; ``None`` without a study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=spec.study.resolved_storage())
    except KeyError:
        return None
    return trials_table(study)


def replay_report(spec: SweepSpec) -> str:
    """What the sweep's early-stopping rule (or the default rule, when the sweep has none)
    would have done to the study as it was recorded, in a few lines.

    Raises:
        ConfigError: when the study does not exist yet.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=spec.study.resolved_storage())
    except KeyError:
        raise ConfigError(
            f"no study '{spec.name}' in {masked_url(spec.study.resolved_storage())} yet"
        ) from None
    rules = spec.study.early_stopping or EarlyStoppingSpec()
    result = replay(study, Rule(rules, list(spec.study.objectives)))
    which = "the sweep's rule" if spec.study.early_stopping else "the default rule"
    lines = [
        f"study '{spec.name}': {which} (from round {rules.from_round}, beaten by at least "
        f"{rules.min_dominating} completed trials, margins {rules.margins or 'none'}) replayed "
        f"on {result.replayed} complete trials with recorded rounds"
    ]
    for number, (round_, by) in sorted(result.stopped.items()):
        lines.append(f"  trial {number}: stopped after round {round_}, beaten by trials {list(by)}")
    lines.append(
        f"  compute: {result.compute_s:.0f} s recorded, {result.saved_s:.0f} s saved "
        f"({100 * result.saved_share:.0f} %); "
        + (
            f"Pareto-optimal trials lost: {result.lost_pareto}"
            if result.lost_pareto
            else "no Pareto-optimal trial lost"
        )
    )
    return "\n".join(lines)
