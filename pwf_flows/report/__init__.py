"""``pwf report``: the methods compared at a glance, from MLflow runs, with the statistics a
reviewer asks for.

:mod:`~pwf_flows.report.collect` selects the runs and reads them, :mod:`.statistics` groups
them into settings (a config's replicates) and computes means, intervals and paired tests with
scipy, :mod:`.figures` draws the accuracy-against-unique-values front and the reliability
diagrams, :mod:`.table` and :mod:`.latex` lay out the numbers, :mod:`.page` writes the
self-contained HTML. Everything is computed before anything is written, so a report that
cannot be made leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pwf_core._files import atomic_path, write_text_atomic
from pwf_flows.report.collect import (
    ReportError,
    ReportRun,
    Selection,
    panels,
    reliability_bins,
    report_run,
    select_runs,
)
from pwf_flows.report.figures import FrontFigure, pooled_bins, reliability_grid
from pwf_flows.report.latex import to_latex
from pwf_flows.report.page import Panel, render
from pwf_flows.report.statistics import (
    ACCURACY,
    DEFAULT_BUDGETS,
    BudgetRow,
    Setting,
    budget_rows,
    methods_in,
    pick_reference,
    resolution,
    settings_of,
)
from pwf_flows.report.table import (
    BUDGET_COLUMNS,
    RUN_COLUMNS,
    setting_columns,
    stats_csv,
    to_csv,
    to_markdown,
)

__all__ = [
    "DEFAULT_BUDGETS",
    "Report",
    "ReportError",
    "Selection",
    "build_report",
    "write_report",
]

RELIABILITY_SHOWN = 6


@dataclass
class Report:
    """A report in memory: its page, figures and tables.

    Args:
        runs: Every run it covers.
        settings: Those runs as settings (replicates grouped), by panel.
        budgets: The table "top-1 at <= K values" of each panel.
        reference: The method the others are compared against.
        html: The page.
        front_png: The accuracy-against-unique-values figure.
        reliability_png: The reliability diagrams (``None``: no run logged its bins).
        csv: The settings table (raw values).
        markdown: The settings, budget and runs tables (the CSV files' columns, formatted).
        latex: The settings and budget tables for a paper (booktabs).
        files: The other CSV files by name: ``comparison.csv``, ``runs.csv``, ``stats.csv``.
    """

    runs: list[ReportRun]
    settings: dict[str, list[Setting]]
    budgets: dict[str, list[BudgetRow]]
    reference: str
    html: str
    front_png: bytes
    reliability_png: bytes | None
    csv: str
    markdown: str
    latex: str
    files: dict[str, str]


def _reliability_choice(
    client: MlflowClient, settings: dict[str, list[Setting]]
) -> list[tuple[Setting, dict]]:
    """Each panel's methods' best settings (by mean top-1), their replicates' bins pooled
    (only those runs' bins are fetched)."""
    chosen = []
    for group in settings.values():
        for method in methods_in(group):
            mine = [s for s in group if s.method == method]
            best = max(mine, key=lambda s: s.mean(ACCURACY))
            bins = [b for run in best.runs if (b := reliability_bins(client, run)) is not None]
            if bins:
                chosen.append((best, pooled_bins(bins)))
    return chosen[:RELIABILITY_SHOWN]


def _markdown(panels_shown: list[Panel], reference: str) -> str:
    settings = [s for panel in panels_shown for s in panel.settings]
    columns = setting_columns(settings)
    lines = [f"Reference method: {reference}.", ""]
    for panel in panels_shown:
        lines += [f"### {panel.title}", "", "#### Settings (mean, sd, 95% CI)", ""]
        lines += to_markdown(columns, panel.settings)
        lines += ["", panel.resolution, "", f"#### Top-1 at <= K values, against {reference}", ""]
        lines += to_markdown(BUDGET_COLUMNS, panel.budgets)
        lines += ["", panel.resolution, "", "#### Runs", ""]
        lines += to_markdown(RUN_COLUMNS, sorted(panel.runs, key=lambda r: (r.method, r.name)))
        lines += ["", panel.resolution, ""]
    return "\n".join(lines)


def build_report(
    client: MlflowClient,
    selection: Selection,
    title: str,
    source: str,
    reference: str | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
) -> Report:
    """The report of the runs ``selection`` names, from ``client``'s store.

    Args:
        client: The MLflow store.
        selection: Which runs.
        title: The page's title.
        source: Where the runs are, as the page names it.
        reference: The method the others are compared against (default: the first by name).
        budgets: The counts of shared values the methods are compared at.

    Raises:
        ReportError: for an unknown experiment, sweep or run, an empty selection, one panel
            asked for runs of different datasets, or a reference method with no run.
    """
    selected = [report_run(run, client.tracking_uri) for run in select_runs(client, selection)]
    settings = settings_of(panels(selected, selection.one_panel))
    # a replicate run again (--fresh) counts once: the runs are the settings' own
    grouped = {title: [r for s in group for r in s.runs] for title, group in settings.items()}
    runs = [run for group in grouped.values() for run in group]
    named = reference is not None
    reference = pick_reference([s for g in settings.values() for s in g], reference)
    shown = [
        Panel(
            title,
            grouped[title],
            settings[title],
            budget_rows(settings[title], reference, budgets),
            resolution(grouped[title]),
        )
        for title in grouped
    ]
    front = FrontFigure(settings, grouped)
    try:
        front_png, front_svg = front.png(), front.svg()
    finally:
        front.close()
    chosen = _reliability_choice(client, settings)
    reliability_png, reliability_svg = reliability_grid(chosen) if chosen else (None, None)
    every = [s for panel in shown for s in panel.settings]
    return Report(
        runs=runs,
        settings=settings,
        budgets={panel.title: panel.budgets for panel in shown},
        reference=reference,
        html=render(title, source, shown, reference, front_svg, reliability_svg, named),
        front_png=front_png,
        reliability_png=reliability_png,
        csv=to_csv(setting_columns(every), every),
        markdown=_markdown(shown, reference),
        latex=to_latex(
            settings,
            {panel.title: panel.budgets for panel in shown},
            {p.title: p.resolution for p in shown},
            reference,
        ),
        files={
            "comparison.csv": to_csv(BUDGET_COLUMNS, [r for p in shown for r in p.budgets]),
            "runs.csv": to_csv(RUN_COLUMNS, [r for p in shown for r in p.runs]),
            "stats.csv": stats_csv(every),
        },
    )


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """Write the report's files into ``folder``; their paths by what they hold."""
    paths = {
        "html": write_text_atomic(folder / "report.html", report.html),
        "csv": write_text_atomic(folder / "table.csv", report.csv),
        "markdown": write_text_atomic(folder / "table.md", report.markdown),
        "latex": write_text_atomic(folder / "table.tex", report.latex),
    }
    for name, text in report.files.items():
        paths[name.removesuffix(".csv")] = write_text_atomic(folder / name, text)
    for name, data in (("front", report.front_png), ("reliability", report.reliability_png)):
        if data is not None:
            with atomic_path(folder / f"{name}.png") as tmp:
                tmp.write_bytes(data)
            paths[name] = folder / f"{name}.png"
    return paths
