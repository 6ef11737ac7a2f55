"""``pwf report``: finished runs compared, as a page, figures and tables
(:mod:`pwf_flows.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def report_command(args: argparse.Namespace) -> int:
    """``pwf report``: every problem with what it is asked for (an unknown experiment or run,
    an empty selection, a tracking URI that does not answer) ends in one line and exit 2,
    before anything is written."""
    from pwf_flows.report.collect import ReportError, Selection
    from pwf_flows.report.statistics import parse_budgets
    from pwf_flows.report.store import open_store

    budgets = parse_budgets(args.budgets)
    sweep = args.sweep
    if sweep is not None and sweep.endswith((".yaml", ".yml")):
        from pwf_flows.sweep.spec import sweep_name

        sweep = sweep_name(Path(sweep))
    selection = Selection(tuple(args.experiment), sweep, tuple(args.run), args.one_panel)
    covered = [*args.experiment, *([sweep] if sweep else []), *args.run]
    title = args.title or f"pwf report: {', '.join(covered)}"
    folder = args.out or Path("reports") / slug(covered)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"--out: '{folder}' is a file, not a folder")
    client, source = open_store(args.tracking_uri)
    from pwf_flows.report import build_report, write_report

    report = build_report(client, selection, title, source, args.reference, budgets)
    paths = write_report(report, folder)
    width = max(len(name) for name in [*paths, "open"]) + 2  # a space after the longest
    print(
        f"pwf report: {len(report.runs)} runs in "
        f"{sum(map(len, report.settings.values()))} settings, against {report.reference}\n"
        + "".join(f"  {name + ':':<{width}}{path}\n" for name, path in paths.items())
        + f"  {'open:':<{width}}file://{paths['html'].resolve()}"
    )
    return 0


def slug(names: list[str]) -> str:
    """A folder name for what a report covers."""
    text = "-".join(names)[:60] or "report"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
