"""The report's figures: accuracy against unique values with one series per method, and the
chosen runs' reliability diagrams side by side; as PNG files and as SVG for the page, where
every point names its run and knobs when the pointer rests on it."""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence

import matplotlib.pyplot as plt

from pwf_flows.plots import accuracy_limits, draw_reliability, fitted_title, log_axis
from pwf_flows.report.collect import ReportRun

X_KEY, Y_KEY = "ws/unique_values", "cls/acc"
X_LABEL = "unique values"
X_MEANING = (
    "Unique values: the distinct values the compressed network's conv/linear weights take "
    "(a codebook's size; for stochastic sharing, its shared Gaussians plus the outliers that "
    "keep a Gaussian of their own)."
)


def non_dominated(runs: Sequence[ReportRun]) -> list[ReportRun]:
    """The runs no other beats on both axes (higher top-1, fewer unique values), by size."""
    kept = [
        run
        for run in runs
        if not any(
            other.metric(Y_KEY) >= run.metric(Y_KEY)
            and other.metric(X_KEY) <= run.metric(X_KEY)
            and (other.metric(Y_KEY) > run.metric(Y_KEY) or other.metric(X_KEY) < run.metric(X_KEY))
            for other in runs
        )
    ]
    return sorted(kept, key=lambda run: run.metric(X_KEY))


def point_label(run: ReportRun) -> str:
    """What a point says of its run: name, knobs, position."""
    knobs = ", ".join(f"{key}={value}" for key, value in run.knobs.items())
    return (
        f"{run.name}\n{run.method}: {knobs or 'defaults'}\n"
        f"top-1 {100 * run.metric(Y_KEY):.2f} %, {int(run.metric(X_KEY))} {X_LABEL}"
    )


def reference_accuracy(runs: Sequence[ReportRun]) -> float | None:
    """The pretrained model's top-1 most of the panel's runs started from."""
    values = [run.pretrained_acc for run in runs if run.pretrained_acc is not None]
    return max(set(values), key=values.count) if values else None


class FrontFigure:
    """Accuracy against unique values, one subplot per panel, one series per method."""

    def __init__(self, panels: dict[str, list[ReportRun]]) -> None:
        self.panels = panels
        count = len(panels)
        self.fig, axes = plt.subplots(1, count, figsize=(6.4 * count, 4.6), squeeze=False)
        self.labels: dict[str, str] = {}
        for ax, (title, runs) in zip(axes[0], panels.items(), strict=True):
            self._panel(ax, title, runs)
        self.fig.tight_layout()

    def _panel(self, ax: plt.Axes, title: str, runs: list[ReportRun]) -> None:
        methods = sorted({run.method for run in runs})
        shown = [100 * run.metric(Y_KEY) for run in runs]
        for index, method in enumerate(methods):
            mine = [run for run in runs if run.method == method]
            colour = f"C{index % 10}"
            front = non_dominated(mine)
            ax.plot(
                [run.metric(X_KEY) for run in front],
                [100 * run.metric(Y_KEY) for run in front],
                "-",
                color=colour,
                lw=1.5,
                label=f"{method} ({len(mine)} run{'s' if len(mine) > 1 else ''})",
            )
            for run in mine:
                gid = f"point-{len(self.labels)}"
                self.labels[gid] = point_label(run)
                (marker,) = ax.plot(
                    [run.metric(X_KEY)],
                    [100 * run.metric(Y_KEY)],
                    "o",
                    color=colour,
                    alpha=1.0 if run in front else 0.35,
                    ms=6,
                )
                marker.set_gid(gid)
            for run in front:
                ax.annotate(
                    ", ".join(f"{k}={v}" for k, v in list(run.knobs.items())[:2]) or run.method,
                    (run.metric(X_KEY), 100 * run.metric(Y_KEY)),
                    textcoords="offset points",
                    xytext=(4, 5),
                    fontsize=6,
                    color=colour,
                )
        reference = reference_accuracy(runs)
        if reference is not None:
            ax.axhline(100 * reference, ls="--", color="0.4", lw=1, label="pretrained")
            shown.append(100 * reference)
        ax.set_ylim(*accuracy_limits(shown))
        log_axis(ax, [run.metric(X_KEY) for run in runs])
        ax.set_xlabel(f"{X_LABEL} (fewer is smaller)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(fitted_title(title, self.fig), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.fig.savefig(buffer, format="png", dpi=120)
        return buffer.getvalue()

    def svg(self) -> str:
        """The figure as inline SVG; each point carries its run's label as a tooltip."""
        buffer = io.StringIO()
        self.fig.savefig(buffer, format="svg")
        text = buffer.getvalue()
        text = text[text.index("<svg") :]  # no XML prologue inside HTML
        for gid, label in self.labels.items():
            text = re.sub(
                rf'(<g id="{gid}"[^>]*>)',
                lambda match, label=label: f"{match.group(1)}<title>{html.escape(label)}</title>",
                text,
                count=1,
            )
        return text

    def close(self) -> None:
        plt.close(self.fig)


def reliability_grid(chosen: list[tuple[ReportRun, dict]]) -> tuple[bytes, str]:
    """The chosen runs' reliability diagrams side by side (with each bin's count), as PNG
    bytes and inline SVG."""
    count = len(chosen)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.3 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    for ax, (run, bins) in zip(axes.flat, chosen, strict=False):
        ece = run.metric("cal/ece")
        title = f"{run.method}: {run.name}\nECE {ece:.4f}" if ece is not None else run.name
        draw_reliability(ax, bins, fitted_title(title, fig, 9))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return png.getvalue(), svg[svg.index("<svg") :]
