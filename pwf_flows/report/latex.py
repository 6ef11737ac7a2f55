"""The report's tables for a paper: LaTeX with booktabs rules (``\\toprule``, ``\\midrule``,
``\\bottomrule``), written by pandas' :meth:`Styler.to_latex`; each cell ``$mean \\pm h$``,
``h`` the half-width of the 95 % Student-t interval."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pwf_flows.report.statistics import ACCURACY, ALPHA, BUDGET, BudgetRow, Setting
from pwf_flows.report.table import Stat, shown_stats

PAPER_STATS = ("top-1 (%)", "Δ top-1 vs pretrained (pt)", "unique values", "ECE", "file bytes")
APART = ("shared values", "outliers")  # where some setting has outliers, counted apart
HEADERS = {
    "top-1 (%)": "Top-1 (\\%)",
    "Δ top-1 vs pretrained (pt)": "$\\Delta$ top-1 (pt)",
    "unique values": "Unique values",
    "shared values": "Shared",
    "outliers": "Outliers",
    "ECE": "ECE",
    "file bytes": "File (bytes)",
    "sampled top-1 (%)": "Sampled top-1 (\\%)",
    "sampled ECE": "Sampled ECE",
}


def _escape(text: str) -> str:
    for char, escaped in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&")):
        text = text.replace(char, escaped)
    return text.replace("#", "\\#").replace("$", "\\$")


def _cell(stat: Stat, setting: Setting) -> str:
    summary = stat.summary(setting)
    if summary is None or summary.n == 0:
        return "--"
    text = stat.number(summary.mean)
    if summary.n >= 2:
        text += f" \\pm {stat.scale * summary.half_width:,.{stat.decimals}f}"
    return f"${text}$".replace(",", "{,}")  # a thousands comma, not a list, in math mode


def _tabular(frame: pd.DataFrame, caption: str, label: str, text_columns: int) -> str:
    styler = frame.style.hide(axis="index")
    return styler.to_latex(
        hrules=True,  # booktabs: \toprule, \midrule, \bottomrule
        column_format="l" * text_columns + "r" * (frame.shape[1] - text_columns),
        caption=caption,
        label=label,
        position_float="centering",
    )


def settings_latex(panel: str, settings: Sequence[Setting], resolution: str, index: int) -> str:
    """One panel's settings: method, knobs, n and the headline metrics as mean ± interval."""
    apart = any(s.mean("ws/outliers") > 0 for s in settings)
    wanted = PAPER_STATS + (APART if apart else ()) + ("sampled top-1 (%)", "sampled ECE")
    stats = [stat for stat in shown_stats(settings) if stat.header in wanted]
    rows = [
        {
            "Method": _escape(setting.method),
            "Knobs": _escape(setting.knobs_text),
            "$n$": str(setting.n),
            **{HEADERS[stat.header]: _cell(stat, setting) for stat in stats},
        }
        for setting in settings
    ]
    caption = (
        f"{_escape(panel)}: mean $\\pm$ half-width of the 95\\,\\% Student-$t$ interval over "
        f"$n$ replicates. {_escape(resolution)}"
    )
    return _tabular(pd.DataFrame(rows), caption, f"tab:pwf-settings-{index}", 2)


def budget_latex(panel: str, rows: Sequence[BudgetRow], reference: str, index: int) -> str:
    """One panel's "top-1 at <= K values": a method per row, a budget per column."""
    budgets = sorted({row.budget for row in rows})
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        cells = table.setdefault(row.method, {"Method": _escape(row.method)})
        cells[f"$\\le {row.budget}$"] = _budget_cell(row)
    frame = pd.DataFrame(
        list(table.values()), columns=["Method", *[f"$\\le {k}$" for k in budgets]]
    )
    caption = (
        f"{_escape(panel)}: each method's best mean top-1 (\\%) $\\pm$ the half-width of its "
        "95\\,\\% Student-$t$ interval among its settings with at most $K$ shared values "
        "(outliers, which keep a value of their own, not counted); in brackets, that "
        "setting's mean count; "
        f"$^{{*}}$: differs from {_escape(reference)} at $p < {ALPHA}$ (paired $t$)."
    )
    return _tabular(frame.fillna("--"), caption, f"tab:pwf-budgets-{index}", 1)


def _budget_cell(row: BudgetRow) -> str:
    setting = row.setting
    if setting is None:
        return "--"
    summary = setting.stats[ACCURACY]
    text = f"{100 * summary.mean:.2f}"
    if summary.n >= 2:
        text += f" \\pm {100 * summary.half_width:.2f}"
    if row.comparison is not None and row.comparison.significant:
        text += "^{*}"
    return f"${text}$ ({setting.mean(BUDGET):.0f})"


def to_latex(
    settings: dict[str, list[Setting]],
    budgets: dict[str, list[BudgetRow]],
    resolutions: dict[str, str],
    reference: str,
) -> str:
    """Every panel's tables, ready for ``\\input`` (needs ``\\usepackage{booktabs}``)."""
    parts = ["% pwf report: needs \\usepackage{booktabs}\n"]
    for index, (panel, group) in enumerate(settings.items()):
        parts.append(settings_latex(panel, group, resolutions[panel], index))
        parts.append(budget_latex(panel, budgets[panel], reference, index))
    return "\n".join(parts)
