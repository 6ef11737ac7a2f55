"""``pwf report``: the methods compared at a glance, from MLflow runs.

:mod:`~pwf_flows.report.collect` selects the runs and reads them, :mod:`.figures` draws the
accuracy-against-unique-values front and the reliability diagrams, :mod:`.table` lays out the
numbers, :mod:`.page` writes the self-contained HTML. Everything is computed before anything
is written, so a report that cannot be made leaves nothing behind.
"""

from __future__ import annotations

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
from pwf_flows.report.figures import FrontFigure, reliability_grid
from pwf_flows.report.page import render
from pwf_flows.report.table import to_csv, to_markdown

__all__ = ["Report", "ReportError", "Selection", "build_report", "write_report"]

RELIABILITY_SHOWN = 6


@dataclass
class Report:
    """A report in memory: its page, figures and tables."""

    runs: list[ReportRun]
    html: str
    front_png: bytes
    reliability_png: bytes | None
    csv: str
    markdown: str


def _reliability_choice(
    client: MlflowClient, grouped: dict[str, list[ReportRun]]
) -> list[tuple[ReportRun, dict]]:
    """Each panel's methods' most accurate runs, with bins (only those runs are fetched)."""
    chosen = []
    for runs in grouped.values():
        best: dict[str, ReportRun] = {}
        for run in runs:
            if run.method not in best or run.metric("cls/acc") > best[run.method].metric("cls/acc"):
                best[run.method] = run
        for run in sorted(best.values(), key=lambda r: r.method):
            bins = reliability_bins(client, run)
            if bins is not None:
                chosen.append((run, bins))
    return chosen[:RELIABILITY_SHOWN]


def build_report(client: MlflowClient, selection: Selection, title: str, source: str) -> Report:
    """The report of the runs ``selection`` names, from ``client``'s store.

    Raises:
        ReportError: for an unknown experiment, sweep or run, an empty selection, or one panel
            asked for runs of different datasets.
    """
    runs = [report_run(run, client.tracking_uri) for run in select_runs(client, selection)]
    grouped = panels(runs, selection.one_panel)
    front = FrontFigure(grouped)
    try:
        front_png, front_svg = front.png(), front.svg()
    finally:
        front.close()
    chosen = _reliability_choice(client, grouped)
    reliability_png, reliability_svg = reliability_grid(chosen) if chosen else (None, None)
    return Report(
        runs=runs,
        html=render(title, source, grouped, front_svg, reliability_svg),
        front_png=front_png,
        reliability_png=reliability_png,
        csv=to_csv(grouped),
        markdown=to_markdown(grouped),
    )


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """Write the report's files into ``folder``; their paths by what they hold."""
    paths = {
        "html": write_text_atomic(folder / "report.html", report.html),
        "csv": write_text_atomic(folder / "table.csv", report.csv),
        "markdown": write_text_atomic(folder / "table.md", report.markdown),
    }
    for name, data in (("front", report.front_png), ("reliability", report.reliability_png)):
        if data is not None:
            with atomic_path(folder / f"{name}.png") as tmp:
                tmp.write_bytes(data)
            paths[name] = folder / f"{name}.png"
    return paths
