"""The report's figures: accuracy against unique values (each setting's mean with its 95 %
intervals on both axes, each method's mean front joined), and reliability diagrams whose
sparse bins cannot be read as miscalibration; as PNG files and as SVG for the page, where every
setting names its method, knobs and numbers when the pointer rests on it."""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.text import Annotation

from pwf_flows.plots import accuracy_limits, draw_reliability, fitted_title, log_axis
from pwf_flows.report.collect import ReportRun
from pwf_flows.report.statistics import MIN_REPLICATES, Setting, Summary

X_KEY, Y_KEY = "ws/unique_values", "cls/acc"
X_LABEL = "unique values"
X_MEANING = (
    "Unique values: the distinct values the compressed network's conv/linear weights take "
    "(a codebook's size; for stochastic sharing, its shared Gaussians plus the outliers that "
    "keep a Gaussian of their own)."
)
LABEL_SIZE = 8
# Settings more than this many points of top-1 below the panel's best (or the pretrained
# model) sit on the axis floor with their value written out: one collapsed setting (3-bit
# uniform at 13 %) would otherwise flatten every other into a line along the top.
FOCUS_PT = 10.0
# ...unless more than this share of the settings would sit there: then the whole range is shown.
MAX_BELOW_SHARE = 0.25
# Where a label may sit relative to its point (points): right-above first, then the other
# corners, then a line further out (crowded fronts, settings side by side on the floor).
PLACES = (
    (6, 5, "left", "bottom"),
    (-6, 5, "right", "bottom"),
    (6, -5, "left", "top"),
    (-6, -5, "right", "top"),
    (6, 16, "left", "bottom"),
    (-6, 16, "right", "bottom"),
    (6, -16, "left", "top"),
    (-6, -16, "right", "top"),
)


def non_dominated(settings: Sequence[Setting]) -> list[Setting]:
    """The settings no other beats on both mean axes (higher top-1, fewer unique values), by
    size."""

    def point(s: Setting) -> tuple[float, float]:
        return s.mean(Y_KEY), s.mean(X_KEY)

    kept = [
        s
        for s in settings
        if not math.isnan(s.mean(X_KEY))
        and not any(
            point(o)[0] >= point(s)[0] and point(o)[1] <= point(s)[1] and point(o) != point(s)
            for o in settings
        )
    ]
    return sorted(kept, key=lambda s: s.mean(X_KEY))


def _interval(summary: Summary | None, scale: float = 1.0) -> str:
    if summary is None or summary.n == 0:
        return "—"
    if summary.n < 2:
        return f"{scale * summary.mean:.2f} (one replicate: no interval)"
    return (
        f"{scale * summary.mean:.2f} ± {scale * summary.half_width:.2f} "
        f"[{scale * summary.low:.2f}, {scale * summary.high:.2f}]"
    )


def setting_tooltip(setting: Setting) -> str:
    """What a point says of its setting: method, knobs, n, its means and intervals."""
    return (
        f"{setting.label}\nn = {setting.n} replicate{'s' if setting.n != 1 else ''}\n"
        f"top-1 (%) {_interval(setting.stats.get(Y_KEY), 100)}\n"
        f"{X_LABEL} {_interval(setting.stats.get(X_KEY))}"
    )


def reference_accuracy(runs: Sequence[ReportRun]) -> float | None:
    """The pretrained model's top-1 most of the panel's runs started from."""
    values = [run.pretrained_acc for run in runs if run.pretrained_acc is not None]
    return max(set(values), key=values.count) if values else None


def _error(summary: Summary | None, floor: float | None = None) -> list[list[float]]:
    """Matplotlib's asymmetric error for one point: none without an interval; a lower end
    cut at ``floor`` (a log axis has no room below it)."""
    if summary is None or summary.n < 2:
        return [[0.0], [0.0]]
    low = summary.low if floor is None else max(summary.low, floor)
    return [[summary.mean - low], [summary.high - summary.mean]]


def _overlaps(box, placed) -> bool:
    return any(box.overlaps(other) for other in placed)


def place_labels(ax: Axes, labels: list[Annotation]) -> None:
    """Move each label to the first place around its point that keeps it inside the axes and
    off the labels already placed (else the first inside)."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []
    for label in labels:
        inside = []
        for dx, dy, ha, va in PLACES:
            label.set_position((dx, dy))
            label.set_ha(ha)
            label.set_va(va)
            box = label.get_window_extent(renderer)
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1):
                inside.append((dx, dy, ha, va))
                if not _overlaps(box, placed):
                    break
        else:
            dx, dy, ha, va = inside[0] if inside else PLACES[0]
            label.set_position((dx, dy))
            label.set_ha(ha)
            label.set_va(va)
        placed.append(label.get_window_extent(renderer))


def _focus(settings: Sequence[Setting], reference: float | None) -> tuple[float, float]:
    """The panel's top-1 range (percent): the settings within :data:`FOCUS_PT` of the best
    (or of the pretrained model), their intervals where replicated enough, and the reference;
    the few settings below are drawn on the floor."""
    means = [100 * s.mean(Y_KEY) for s in settings]
    top = max([*means, *([100 * reference] if reference is not None else [])], default=100.0)
    near = [s for s, mean in zip(settings, means, strict=True) if mean >= top - FOCUS_PT]
    if len(near) < (1 - MAX_BELOW_SHARE) * len(settings):
        near = list(settings)  # many far below: that is the picture, shown whole
    shown = [100 * s.mean(Y_KEY) for s in near]
    shown += [100 * y for s in near for run in s.runs if (y := run.metric(Y_KEY)) is not None]
    # the intervals of well-replicated settings fit in; a two-seed interval may run off
    shown += [
        100 * end
        for s in near
        if s.n >= MIN_REPLICATES and (y := s.stats.get(Y_KEY)) is not None
        for end in (y.low, y.high)
    ]
    if reference is not None:
        shown.append(100 * reference)
    return accuracy_limits(shown)


def _label(ax: Axes, text: str, point: tuple[float, float], colour: str) -> Annotation:
    """A setting's label at ``point``, where :func:`place_labels` will move it."""
    return ax.annotate(
        text,
        point,
        textcoords="offset points",
        xytext=PLACES[0][:2],
        fontsize=LABEL_SIZE,
        color=colour,
        annotation_clip=False,
    )


class FrontFigure:
    """Accuracy against unique values, one subplot per panel, one series per method."""

    def __init__(self, settings: dict[str, list[Setting]], runs: dict[str, list[ReportRun]]):
        self.settings = settings
        count = len(settings)
        self.fig, axes = plt.subplots(1, count, figsize=(7.2 * count, 5.4), squeeze=False)
        self.labels: dict[str, str] = {}
        self.annotations: list[tuple[Axes, list[Annotation]]] = []
        for ax, (title, group) in zip(axes[0], settings.items(), strict=True):
            self._panel(ax, title, group, runs.get(title, []))
        self.fig.tight_layout()
        for ax, labels in self.annotations:
            place_labels(ax, labels)

    def _panel(self, ax: Axes, title: str, settings: list[Setting], runs: list[ReportRun]) -> None:
        methods = sorted({s.method for s in settings})
        reference = reference_accuracy(runs)
        low, high = _focus(settings, reference)
        xs = [run.metric(X_KEY) for run in runs if run.metric(X_KEY)]
        labels: list[Annotation] = []
        for index, method in enumerate(methods):
            mine = [s for s in settings if s.method == method]
            colour = f"C{index % 10}"
            front = non_dominated(mine)
            self._replicates(ax, [run for s in mine for run in s.runs], colour)
            replicates = sorted({s.n for s in mine})
            n_text = "/".join(map(str, replicates))
            ax.plot(
                [s.mean(X_KEY) for s in front],
                [100 * s.mean(Y_KEY) for s in front],
                "-",
                color=colour,
                lw=1.5,
                label=f"{method} ({len(mine)} setting{'s' if len(mine) > 1 else ''}, n = {n_text})",
            )
            for setting in mine:
                self._setting(ax, setting, colour, setting in front)
                if 100 * setting.mean(Y_KEY) < low:
                    labels.append(self._below(ax, setting, colour, low))
            labels += [
                _label(ax, setting.label, (setting.mean(X_KEY), 100 * setting.mean(Y_KEY)), colour)
                for setting in front
                if 100 * setting.mean(Y_KEY) >= low
            ]
        self.annotations.append((ax, labels))
        if reference is not None:
            ax.axhline(100 * reference, ls="--", color="0.4", lw=1, label="pretrained")
        ax.set_ylim(low, high)
        log_axis(ax, xs)
        if xs:
            least, most = min(xs), max(xs)
            pad = (most / least) ** 0.12 if ax.get_xscale() == "log" else None
            if pad is not None and pad > 1:
                ax.set_xlim(least / pad, most * pad)
        scale = " (log scale)" if ax.get_xscale() == "log" else ""
        ax.set_xlabel(f"{X_LABEL}{scale}")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(fitted_title(title, self.fig), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)

    def _below(self, ax: Axes, setting: Setting, colour: str, floor: float) -> Annotation:
        """A setting far below the others: a marker on the axis floor, its top-1 in the label
        (a collapsed setting would otherwise squeeze the rest into a line at the top)."""
        x = setting.mean(X_KEY)
        ax.plot([x], [floor], "v", color=colour, ms=7, clip_on=False, zorder=5)
        text = f"{setting.label}: {100 * setting.mean(Y_KEY):.1f} %, below"
        return _label(ax, text, (x, floor), colour)

    def _replicates(self, ax: Axes, runs: list[ReportRun], colour: str) -> None:
        """Each replicate as a faint dot: the spread behind a mean."""
        ax.plot(
            [run.metric(X_KEY) for run in runs],
            [100 * run.metric(Y_KEY) for run in runs],
            ".",
            color=colour,
            alpha=0.25,
            ms=4,
        )

    def _setting(self, ax: Axes, setting: Setting, colour: str, on_front: bool) -> None:
        gid = f"setting-{len(self.labels)}"
        self.labels[gid] = setting_tooltip(setting)
        x, y = setting.stats.get(X_KEY), setting.stats.get(Y_KEY)
        container = ax.errorbar(
            [setting.mean(X_KEY)],
            [100 * setting.mean(Y_KEY)],
            xerr=_error(x, floor=1.0),
            yerr=[[100 * v for v in part] for part in _error(y)],
            fmt="o",
            color=colour,
            alpha=1.0 if on_front else 0.4,
            ms=6,
            capsize=3,
            elinewidth=1,
        )
        container[0].set_gid(gid)

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.fig.savefig(buffer, format="png", dpi=120)
        return buffer.getvalue()

    def svg(self) -> str:
        """The figure as inline SVG; each setting's point carries its numbers as a tooltip."""
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


def pooled_bins(many: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Reliability bins of several replicates as one: counts added, accuracy and confidence
    weighted by count (the bins' edges are pwf's, the same for every run)."""
    first = many[0]
    count = [sum(b["count"][i] for b in many) for i in range(len(first["count"]))]

    def weighted(key: str) -> list[float]:
        return [
            sum(b[key][i] * b["count"][i] for b in many) / count[i] if count[i] else 0.0
            for i in range(len(count))
        ]

    return {
        "lower": first["lower"],
        "upper": first["upper"],
        "confidence": weighted("confidence"),
        "accuracy": weighted("accuracy"),
        "count": count,
    }


def reliability_grid(chosen: list[tuple[Setting, dict]]) -> tuple[bytes, str]:
    """The chosen settings' reliability diagrams side by side, as PNG bytes and inline SVG."""
    count = len(chosen)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 5.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    for ax, (setting, bins) in zip(axes.flat, chosen, strict=False):
        ece = setting.stats.get("cal/ece")
        title = setting.label
        if ece is not None and ece.n:
            spread = f" ± {ece.half_width:.4f}" if ece.n > 1 else ""
            title += f"\nECE {ece.mean:.4f}{spread} (n = {ece.n})"
        if setting.n > 1:
            title += f", bins of {setting.n} replicates pooled"
        draw_reliability(ax, bins, fitted_title(title, fig, 9))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return png.getvalue(), svg[svg.index("<svg") :]
