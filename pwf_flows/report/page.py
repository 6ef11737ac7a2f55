"""The report as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched
from anywhere (it opens offline, and inside MLflow's artifact viewer)."""

from __future__ import annotations

import html
from datetime import UTC, datetime

from pwf_flows.report.collect import ReportRun
from pwf_flows.report.figures import X_MEANING
from pwf_flows.report.table import FIELDS, knobs_text, ordered

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
p.meta, p.note { color: #555; font-size: 0.85rem; max-width: 60rem; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
tr:hover td { background: #fafafa; }
"""


def _link(url: str | None, text: str) -> str:
    if not url:
        return "—"
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>'


def _table(runs: list[ReportRun]) -> str:
    head = "".join(f"<th>{html.escape(field.header)}</th>" for field in FIELDS)
    rows = []
    for run in ordered(runs):
        cells = "".join(
            f'<td data-key="{html.escape(field.key or field.header)}" '
            f'data-value="{"" if field.of(run) is None else repr(field.of(run))}">'
            f"{html.escape(field.cell(run))}</td>"
            for field in FIELDS
        )
        rows.append(
            f'<tr data-run="{run.run_id}"><td class="text">{html.escape(run.method)}</td>'
            f'<td class="text">{_link(run.url, run.name)}</td>'
            f'<td class="text">{html.escape(knobs_text(run))}</td>{cells}'
            f'<td class="text">{_link(run.prefect_url, "flow run")}</td></tr>'
        )
    return (
        '<table><thead><tr><th class="text">method</th><th class="text">run (MLflow)</th>'
        f'<th class="text">knobs</th>{head}<th class="text">Prefect</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render(
    title: str,
    source: str,
    panels: dict[str, list[ReportRun]],
    front_svg: str,
    reliability_svg: str | None,
) -> str:
    """The whole page."""
    runs = sum(len(group) for group in panels.values())
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{runs} runs from {html.escape(source)}; made {made}.</p>',
        "<h2>Accuracy against unique values</h2>",
        f'<figure id="front">{front_svg}<figcaption><p class="note">'
        "Each method's non-dominated runs (higher top-1 with fewer values) are joined; the "
        "others are faint. The dashed line is the pretrained model. Rest the pointer on a "
        f"point for its run and knobs. {html.escape(X_MEANING)}</p></figcaption></figure>",
    ]
    for panel, group in panels.items():
        sections += [f"<h2>{html.escape(panel)}</h2>", _table(group)]
    if reliability_svg is not None:
        sections += [
            "<h2>Calibration</h2>",
            f'<figure id="reliability">{reliability_svg}<figcaption><p class="note">Each '
            "method's most accurate run: accuracy per confidence bin, the gap to the diagonal "
            "hatched; the number over a bar is its count of test samples.</p></figcaption>"
            "</figure>",
        ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
