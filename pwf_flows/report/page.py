"""The report as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched
from anywhere (it opens offline, and inside MLflow's artifact viewer)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime

from pwf_flows.plots import SPARSE_BIN
from pwf_flows.report.collect import ReportRun
from pwf_flows.report.figures import X_MEANING
from pwf_flows.report.statistics import (
    ALPHA,
    CONFIDENCE,
    MIN_REPLICATES,
    BudgetRow,
    Setting,
    few_replicates,
)
from pwf_flows.report.table import (
    BUDGET_PAGE_COLUMNS,
    FIELDS,
    TOP1,
    Column,
    knobs_text,
    ordered,
    shown_stats,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 0.3rem; }
p.meta, p.note, p.resolution { color: #555; font-size: 0.85rem; max-width: 60rem; }
p.resolution { margin-top: 0; color: #333; }
p.warning { background: #fff3cd; border: 1px solid #e0b100; padding: 0.5rem 0.8rem;
  max-width: 60rem; font-size: 0.9rem; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
div.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0 0.3rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.45rem; text-align: right;
  white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
tr.reference td { background: #f1f6fb; }
tr:hover td { background: #fafafa; }
"""


@dataclass(frozen=True)
class Panel:
    """What one panel of the page shows."""

    title: str
    runs: list[ReportRun]
    settings: list[Setting]
    budgets: list[BudgetRow]
    resolution: str


def _link(url: str | None, text: str) -> str:
    if not url:
        return "—"
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>'


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


def _resolution(text: str) -> str:
    return f'<p class="resolution">{html.escape(text)}</p>'


def _wrap(table: str) -> str:
    return f'<div class="scroll">{table}</div>'


def _settings_table(settings: list[Setting]) -> str:
    stats = shown_stats(settings)
    head = (
        '<th class="text">method</th><th class="text">knobs (as resolved)</th><th>n</th>'
        + "".join(f"<th>{html.escape(stat.header)}</th>" for stat in stats[:1])
        + "<th>top-1 sd (pt)</th><th>top-1 95 % CI (%)</th>"
        + "".join(f"<th>{html.escape(stat.header)}</th>" for stat in stats[1:])
        + '<th class="text">replicates (MLflow)</th>'
    )
    rows = []
    for setting in settings:
        cells = []
        for index, stat in enumerate(stats):
            summary = stat.summary(setting)
            attributes = (
                ""
                if summary is None
                else f' data-n="{summary.n}" data-mean="{_num(summary.mean)}" '
                f'data-sd="{_num(summary.sd)}" data-low="{_num(summary.low)}" '
                f'data-high="{_num(summary.high)}"'
            )
            cells.append(
                f'<td data-key="{html.escape(stat.key)}"{attributes}>'
                f"{html.escape(stat.mean_ci(setting))}</td>"
            )
            if index == 0:
                cells.append(f'<td class="sd">{_top1_sd(setting)}</td>')
                cells.append(f'<td class="ci">{_top1_ci(setting)}</td>')
        links = " ".join(_link(run.url, f"r{run.replicate}") for run in setting.runs)
        rows.append(
            f'<tr data-setting="{html.escape(setting.key)}" data-method="'
            f'{html.escape(setting.method)}"><td class="text">{html.escape(setting.method)}</td>'
            f'<td class="text">{html.escape(setting.knobs_text)}</td><td>{setting.n}</td>'
            f'{"".join(cells)}<td class="text">{links}</td></tr>'
        )
    return _wrap(
        f'<table class="settings"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _top1_sd(setting: Setting) -> str:
    summary = TOP1.summary(setting)
    return "—" if summary is None or summary.n < 2 else f"{100 * summary.sd:.2f}"


def _top1_ci(setting: Setting) -> str:
    summary = TOP1.summary(setting)
    if summary is None or summary.n < 2:
        return "— (n = 1)" if summary is not None else "—"
    return f"[{100 * summary.low:.2f}, {100 * summary.high:.2f}]"


def _cell(column: Column, row: object) -> str:
    css = "" if column.numeric else ' class="text"'
    return f"<td{css}>{html.escape(column.text(row))}</td>"


def _budget_table(rows: list[BudgetRow]) -> str:
    head = "".join(
        f"<th{'' if c.numeric else ' class=text'}>{html.escape(c.header)}</th>"
        for c in BUDGET_PAGE_COLUMNS
    )
    body = "".join(
        f'<tr data-budget="{row.budget}" data-method="{html.escape(row.method)}"'
        f"{' class=reference' if row.is_reference else ''}>"
        + "".join(_cell(column, row) for column in BUDGET_PAGE_COLUMNS)
        + "</tr>"
        for row in rows
    )
    return _wrap(
        f'<table class="budgets"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _runs_table(runs: list[ReportRun]) -> str:
    head = "".join(f"<th>{html.escape(field.header)}</th>" for field in FIELDS)
    rows = []
    for run in ordered(runs):
        cells = "".join(
            f'<td data-key="{html.escape(field.key or field.header)}" '
            f'data-value="{_num(field.of(run))}">{html.escape(field.cell(run))}</td>'
            for field in FIELDS
        )
        rows.append(
            f'<tr data-run="{run.run_id}"><td class="text">{html.escape(run.method)}</td>'
            f'<td class="text">{_link(run.url, run.name)}</td><td>{run.replicate}</td>'
            f'<td class="text">{html.escape(knobs_text(run))}</td>{cells}'
            f'<td class="text">{_link(run.prefect_url, "flow run")}</td></tr>'
        )
    return _wrap(
        '<table class="runs"><thead><tr><th class="text">method</th>'
        '<th class="text">run (MLflow)</th><th>replicate</th><th class="text">knobs</th>'
        f'{head}<th class="text">Prefect</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _warning(settings: list[Setting]) -> str:
    few = few_replicates(settings)
    if not few:
        return ""
    names = ", ".join(f"{s.label} (n = {s.n})" for s in few[:8])
    more = f" and {len(few) - 8} more" if len(few) > 8 else ""
    return (
        f'<p class="warning" id="few-replicates"><strong>Warning:</strong> {len(few)} of '
        f"{len(settings)} settings have fewer than {MIN_REPLICATES} replicates: "
        f"{html.escape(names + more)}. With one replicate there is no interval and no test; with "
        "two, the interval is wide and the tests are weak. A difference between such settings "
        "may be seed noise (run the sweep with study.replicates: 3 or more).</p>"
    )


def _budget_note(reference: str) -> str:
    return (
        '<p class="note">For each budget K, each method\'s setting with the best mean top-1 '
        "among those whose mean count of shared values is at most K (a stochastic-sharing "
        "method's Gaussians; its outliers, which keep a value of their own, are shown beside). "
        f"Δ is that setting's top-1 minus the reference's ({html.escape(reference)}) on the "
        "replicates both ran (same base seed and replicate index: the same pretrained model), "
        f"with its {CONFIDENCE:.0%} Student-t interval, the paired t-test's and Wilcoxon's "
        f"signed-rank test's two-sided p-values; significant means p < {ALPHA} (paired t). "
        "Wilcoxon's test cannot reach p < 0.05 with fewer than 6 pairs.</p>"
    )


def render(
    title: str,
    source: str,
    panels: list[Panel],
    reference: str,
    front_svg: str,
    reliability_svg: str | None,
    named: bool = False,
) -> str:
    """The whole page (``named``: the reference was asked for, not the default)."""
    runs = sum(len(panel.runs) for panel in panels)
    settings = [s for panel in panels for s in panel.settings]
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{runs} runs in {len(settings)} settings from {html.escape(source)}; '
        f"made {made}.</p>",
        _warning(settings),
        f'<p class="note" id="reference">Methods are compared against <strong>'
        f"{html.escape(reference)}</strong> ("
        + (
            "named with <code>--reference</code>"
            if named
            else "the first method in this report; <code>pwf report --reference METHOD</code> "
            "names another"
        )
        + ").</p>",
        "<h2>Accuracy against unique values</h2>",
        f'<figure id="front">{front_svg}<figcaption><p class="note">'
        f"Each setting's mean over its replicates, with the {CONFIDENCE:.0%} Student-t "
        "interval on both axes (none for a single replicate; faint dots: the replicates). "
        "Each method's non-dominated settings (higher top-1 with fewer values) are joined and "
        "labelled with their knobs as the runs resolved them. The dashed line is the "
        f"pretrained model. Rest the pointer on a point for its numbers. "
        f"{html.escape(X_MEANING)}</p></figcaption></figure>",
    ]
    for panel in panels:
        sections += [
            f"<h2>{html.escape(panel.title)}</h2>",
            f"<h3>Settings: mean ± half-width of the {CONFIDENCE:.0%} interval</h3>",
            _settings_table(panel.settings),
            _resolution(panel.resolution),
            f"<h3>Top-1 at ≤ K values, against {html.escape(reference)}</h3>",
            _budget_table(panel.budgets),
            _resolution(panel.resolution),
            _budget_note(reference),
            "<h3>Runs</h3>",
            f"<details open><summary>every run ({len(panel.runs)})</summary>"
            f"{_runs_table(panel.runs)}</details>",
            _resolution(panel.resolution),
        ]
    if reliability_svg is not None:
        sections += [
            "<h2>Calibration</h2>",
            f'<figure id="reliability">{reliability_svg}<figcaption><p class="note">Each '
            "method's best setting: accuracy per confidence bin (its replicates' bins pooled) "
            "with its 95 % binomial interval, the gap to the diagonal hatched; the number over "
            f"a bar is its count of test samples. Bins of fewer than {SPARSE_BIN} samples are "
            "faded and show no gap: too few samples to tell miscalibration from chance."
            "</p></figcaption></figure>",
        ]
    body = "\n".join(part for part in sections if part)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
