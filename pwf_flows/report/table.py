"""The report's tables, each one list of columns written three ways: CSV (raw values), Markdown
and HTML cells (formatted). CSV and Markdown therefore carry the same columns.

- the settings table: one row per method x model x setting, each headline metric as mean, sd,
  and the ends of its 95 % interval (every final metric's statistics go to ``stats.csv``);
- the budget table: "top-1 at <= K values", each method against the reference;
- the runs table: one row per run, its raw values and links.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pwf_flows.report.collect import ReportRun
from pwf_flows.report.statistics import (
    ACCURACY,
    BUDGET,
    DELTA,
    BudgetRow,
    Setting,
    Summary,
)


@dataclass(frozen=True)
class Field:
    """A per-run column: its header, the metric (or ``None`` for a computed one), its format."""

    header: str
    key: str | None
    fmt: Callable[[float], str]
    value: Callable[[ReportRun], float | None] | None = None

    def of(self, run: ReportRun) -> float | None:
        value = self.value(run) if self.value is not None else run.metric(self.key or "")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    def cell(self, run: ReportRun) -> str:
        value = self.of(run)
        return "—" if value is None else self.fmt(value)


def _delta(run: ReportRun) -> float | None:
    accuracy = run.metric(ACCURACY)
    if accuracy is None or run.pretrained_acc is None:
        return None
    return accuracy - run.pretrained_acc


def _count(value: float) -> str:
    return f"{round(value):,}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


FIELDS = (
    Field("top-1", ACCURACY, _percent),
    Field("Δ top-1 vs pretrained", None, lambda v: f"{100 * v:+.2f} pt", _delta),
    Field("unique values", "ws/unique_values", _count),
    Field("shared values", "ws/shared_values", _count),
    Field("outliers", "ws/outliers", _count),
    Field("entropy (bits)", "ws/entropy_bits", lambda v: f"{v:.2f}"),
    Field("file bytes (entropy-coded)", "size/file_bytes", _count),
    Field("fixed-length bytes", "size/fixed_length_bytes", _count),
    Field("entropy bound bytes", "size/entropy_bound_bytes", _count),
    Field("× smaller than float32", "size/compression_ratio", lambda v: f"{v:.1f}×"),
    Field("ONNX bytes", "size/onnx_bytes", _count),
    Field("ECE", "cal/ece", lambda v: f"{v:.4f}"),
    Field("NLL", "cls/nll", lambda v: f"{v:.4f}"),
    Field("trainable parameters", "size/trainable_params", _count),
)


def knobs_text(run: ReportRun) -> str:
    """The run's size knobs as it resolved them (``b=5, max_order=4``)."""
    return ", ".join(f"{key}={value}" for key, value in run.knobs.items()) or "no size knob"


def ordered(runs: list[ReportRun]) -> list[ReportRun]:
    """By method, then best top-1 first."""
    return sorted(runs, key=lambda run: (run.method, -(run.metric(ACCURACY) or 0.0)))


@dataclass(frozen=True)
class Column:
    """A column of a table: its header, its raw value for a row, and how a reader sees that
    value (Markdown, HTML); ``numeric`` cells are right-aligned and never wrap. The CSV holds
    the raw value times ``scale``: in the unit the header names (``top-1 (%)``: percent)."""

    header: str
    raw: Callable[[Any], Any]
    fmt: Callable[[Any], str] = str
    numeric: bool = True
    scale: float = 1.0

    def csv_value(self, row: Any) -> Any:
        value = self.raw(row)
        if isinstance(value, float | int) and not isinstance(value, bool) and self.scale != 1:
            return float(value) * self.scale
        return value

    def text(self, row: Any) -> str:
        value = self.raw(row)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        return self.fmt(value)


def to_csv(columns: Sequence[Column], rows: Sequence[Any]) -> str:
    """Unrounded values in the headers' units (percent, points, counts, bytes), one line per
    row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([column.header for column in columns])
    for row in rows:
        values = [column.csv_value(row) for column in columns]
        writer.writerow(
            ["" if _missing(v) else repr(v) if isinstance(v, float) else v for v in values]
        )
    return buffer.getvalue()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def to_markdown(columns: Sequence[Column], rows: Sequence[Any]) -> list[str]:
    """The same columns, formatted as the page shows them."""
    lines = ["| " + " | ".join(column.header for column in columns) + " |"]
    lines.append("|" + "".join(" ---: |" if c.numeric else " --- |" for c in columns))
    for row in rows:
        lines.append(
            "| " + " | ".join(column.text(row).replace("|", "\\|") for column in columns) + " |"
        )
    return lines


# -- the settings table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A metric summarised per setting: header, key, scale (100 for percent) and decimals."""

    header: str
    key: str
    scale: float = 1.0
    decimals: int = 4
    signed: bool = False

    def number(self, value: float) -> str:
        sign = "+" if self.signed else ""
        return f"{self.scale * value:{sign},.{self.decimals}f}"

    def summary(self, setting: Setting) -> Summary | None:
        return setting.stats.get(self.key)

    def mean_ci(self, setting: Setting) -> str:
        """``99.07 ± 0.40`` (mean ± half-width of the 95 % interval), or the mean alone for one
        replicate."""
        summary = self.summary(setting)
        if summary is None or summary.n == 0:
            return "—"
        if summary.n < 2:
            return self.number(summary.mean)
        half = f"{self.scale * summary.half_width:,.{self.decimals}f}"
        return f"{self.number(summary.mean)} ± {half}"

    def columns(self) -> list[Column]:
        def part(name: str) -> Callable[[Setting], float | None]:
            def value(setting: Setting) -> float | None:
                summary = self.summary(setting)
                return None if summary is None else getattr(summary, name)

            return value

        plain = f"{{:,.{self.decimals}f}}".format
        scale = self.scale
        return [
            Column(f"{self.header} mean", part("mean"), self.number, scale=scale),
            Column(f"{self.header} sd", part("sd"), lambda v: plain(scale * v), scale=scale),
            Column(f"{self.header} 95% CI low", part("low"), self.number, scale=scale),
            Column(f"{self.header} 95% CI high", part("high"), self.number, scale=scale),
        ]


STATS = (
    Stat("top-1 (%)", ACCURACY, 100, 2),
    Stat("Δ top-1 vs pretrained (pt)", DELTA, 100, 2, signed=True),
    Stat("unique values", "ws/unique_values", 1, 1),
    Stat("shared values", "ws/shared_values", 1, 1),
    Stat("outliers", "ws/outliers", 1, 1),
    Stat("ECE", "cal/ece", 1, 4),
    Stat("NLL", "cls/nll", 1, 4),
    Stat("file bytes", "size/file_bytes", 1, 0),
    Stat("sampled top-1 (%)", "sampled/cls/acc", 100, 2),
    Stat("sampled ECE", "sampled/cal/ece", 1, 4),
)
OPTIONAL = {"sampled/cls/acc", "sampled/cal/ece"}  # only models that stay stochastic have them


def shown_stats(settings: Sequence[Setting]) -> list[Stat]:
    """The headline metrics, the sampled ones only where some setting has them (a fully fixed
    model is deterministic: it has none)."""
    return [
        stat
        for stat in STATS
        if stat.key not in OPTIONAL or any(stat.key in s.stats for s in settings)
    ]


def _runs_of(setting: Setting) -> str:
    return " ".join(run.run_id for run in setting.runs)


SETTING_HEAD = (
    Column("panel", lambda s: s.panel, numeric=False),
    Column("method", lambda s: s.method, numeric=False),
    Column("knobs", lambda s: s.knobs_text, numeric=False),
    Column("setting", lambda s: s.key, lambda v: v[:8], numeric=False),
    Column("n", lambda s: s.n),
)


def setting_columns(settings: Sequence[Setting]) -> list[Column]:
    """The settings table's columns (CSV and Markdown)."""
    stats = [column for stat in shown_stats(settings) for column in stat.columns()]
    return [*SETTING_HEAD, *stats, Column("runs", _runs_of, numeric=False)]


# -- the budget table ------------------------------------------------------------------------


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _pt(value: float) -> str:
    return f"{100 * value:+.2f}"


def _of_setting(get: Callable[[Setting], Any]) -> Callable[[BudgetRow], Any]:
    return lambda row: None if row.setting is None else get(row.setting)


def _of_comparison(name: str) -> Callable[[BudgetRow], Any]:
    return lambda row: None if row.comparison is None else getattr(row.comparison, name)


TOP1 = STATS[0]
BUDGET_COLUMNS = (
    Column("K (values at most)", lambda row: row.budget),
    Column("method", lambda row: row.method, numeric=False),
    Column("knobs", _of_setting(lambda s: s.knobs_text), numeric=False),
    Column("n", _of_setting(lambda s: s.n)),
    Column("shared values mean", _of_setting(lambda s: s.mean(BUDGET)), lambda v: f"{v:,.1f}"),
    Column("outliers mean", _of_setting(lambda s: s.mean("ws/outliers")), lambda v: f"{v:,.1f}"),
    Column(
        "top-1 (%) mean",
        _of_setting(lambda s: s.mean(ACCURACY)),
        lambda v: f"{100 * v:.2f}",
        scale=100,
    ),
    Column(
        "top-1 (%) 95% CI half-width",
        _of_setting(lambda s: s.stats[ACCURACY].half_width),
        lambda v: f"{100 * v:.2f}",
        scale=100,
    ),
    Column("pairs", _of_comparison("n")),
    Column("Δ top-1 vs reference (pt)", _of_comparison("mean"), _pt, scale=100),
    Column("Δ 95% CI low (pt)", _of_comparison("low"), _pt, scale=100),
    Column("Δ 95% CI high (pt)", _of_comparison("high"), _pt, scale=100),
    Column("p (paired t)", _of_comparison("p_t"), _p),
    Column("p (Wilcoxon)", _of_comparison("p_wilcoxon"), _p),
    Column("verdict", lambda row: row.verdict, numeric=False),
)


def _delta_interval(row: BudgetRow) -> str | None:
    comparison = row.comparison
    if comparison is None or math.isnan(comparison.mean):
        return None
    if math.isnan(comparison.low):
        return _pt(comparison.mean)
    return f"{_pt(comparison.mean)} [{_pt(comparison.low)}, {_pt(comparison.high)}]"


# The page's budget table: the CSV's values, shorter headers, each interval in one cell.
BUDGET_PAGE_COLUMNS = (
    Column("K", lambda row: row.budget),
    *BUDGET_COLUMNS[1:4],
    Column("shared values", BUDGET_COLUMNS[4].raw, BUDGET_COLUMNS[4].fmt),
    Column("outliers", BUDGET_COLUMNS[5].raw, BUDGET_COLUMNS[5].fmt),
    Column("top-1 (%) ± 95% CI", _of_setting(TOP1.mean_ci)),
    Column("pairs", _of_comparison("n")),
    Column("Δ top-1 (pt) [95% CI]", _delta_interval),
    Column("p (paired t)", _of_comparison("p_t"), _p),
    Column("p (Wilcoxon)", _of_comparison("p_wilcoxon"), _p),
    BUDGET_COLUMNS[-1],
)

# -- the runs table --------------------------------------------------------------------------

RUN_COLUMNS = (
    Column("panel", lambda r: r.panel, numeric=False),
    Column("method", lambda r: r.method, numeric=False),
    Column("run", lambda r: r.name, numeric=False),
    Column("run_id", lambda r: r.run_id, numeric=False),
    Column("knobs", knobs_text, numeric=False),
    Column("setting", lambda r: r.setting, lambda v: v[:8], numeric=False),
    Column("seed", lambda r: r.seed),
    Column("replicate", lambda r: r.replicate),
    *(Column(f.header, f.of, f.fmt) for f in FIELDS),
    Column("mlflow_url", lambda r: r.url, numeric=False),
    Column("prefect_url", lambda r: r.prefect_url, numeric=False),
)


def stats_csv(settings: Sequence[Setting]) -> str:
    """Every final metric of every setting: mean, sd, n and the 95 % interval (long form)."""
    rows = [
        (setting, key, summary)
        for setting in settings
        for key, summary in sorted(setting.stats.items())
    ]
    columns = (
        Column("panel", lambda r: r[0].panel),
        Column("method", lambda r: r[0].method),
        Column("knobs", lambda r: r[0].knobs_text),
        Column("setting", lambda r: r[0].key),
        Column("metric", lambda r: r[1]),
        Column("n", lambda r: r[2].n),
        Column("mean", lambda r: r[2].mean),
        Column("sd", lambda r: r[2].sd),
        Column("ci95_low", lambda r: r[2].low),
        Column("ci95_high", lambda r: r[2].high),
    )
    return to_csv(columns, rows)
