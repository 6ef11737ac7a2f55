"""Figures logged with runs and put in reports (matplotlib, headless).

Made to go into a paper: accuracy axes in percent that never claim more than 100 % (a small
spread is shown on an axis at least :data:`MIN_SPAN` points tall, so a 0.2-point wobble does
not fill the figure), log axes with plain tick labels (``20``, not ``2x10^1``) where values
span decades, point labels that cannot be read as ranges, and titles wrapped to the figure.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from scipy import stats

from pwf_core._files import atomic_path
from pwf_core.methods import Figure

MIN_SPAN = 5.0  # percentage points
ELLIPSES_SHOWN = 40  # the most populated Gaussians get their 95 % ellipse drawn
POINTS_SHOWN = 20_000


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def fitted_title(title: str, fig: plt.Figure, fontsize: float = 10) -> str:
    """``title`` wrapped to the figure's width (a long run name otherwise runs off it)."""
    width = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def plain_number(value: float, _position: float | None = None) -> str:
    """A tick label as a person writes it: ``20``, ``300``, ``0.5``, ``2,000``."""
    if value >= 1 and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:g}"


def log_axis(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    """A log axis with plain labels at 1, 2 and 5 times the powers of ten, when the values
    span more than a factor of ten; a plain linear axis otherwise."""
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if not finite or max(finite) / min(finite) < 10:
        return
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(plain_number))
    target.set_minor_formatter(NullFormatter())


def accuracy_limits(values: Sequence[float], min_span: float = MIN_SPAN) -> tuple[float, float]:
    """A y-range in percent around ``values`` (percent): at least ``min_span`` tall, within
    [0, 100]."""
    finite = [v for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 100.0)
    pad = max((min_span - (high - low)) / 2, 0.1 * (high - low), 0.5)
    low, high = low - pad, high + pad
    if high > 100.0:
        low, high = low - (high - 100.0), 100.0
    return max(low, 0.0), high


def round_label(numbers: Sequence[int]) -> str:
    """Rounds that land on one point: ``r3``, a run ``r8–r10``, else a list ``r1, r3``."""
    numbers = sorted(numbers)
    if len(numbers) == 1:
        return f"r{numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"r{numbers[0]}–r{numbers[-1]}"
    return ", ".join(f"r{n}" for n in numbers)


def _point_labels(rounds: pd.DataFrame, x: str, y: str) -> list[tuple[float, float, str]]:
    """One label per distinct point: rounds that land on the same point share it."""
    return [
        (px, py, round_label([int(r) for r in group["round"]]))
        for (px, py), group in rounds.groupby([x, y], sort=False)
    ]


def accuracy_vs_unique_values(
    rounds: pd.DataFrame, path: Path, title: str, pretrained_acc: float | None = None
) -> Path:
    """Top-1 after each round against the unique values among the weights fixed so far.

    Args:
        rounds: One row per round with ``round``, ``ws/unique_fixed_values``, ``cls/acc``.
        path: PNG to write.
        title: Names the run.
        pretrained_acc: The uncompressed model's top-1 (a dashed reference line).
    """
    x, y = "ws/unique_fixed_values", "cls/acc"
    data = rounds.assign(acc_pct=100 * rounds[y])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(data[x], data["acc_pct"], marker="o", color="C0", label="after each round")
    shown = list(data["acc_pct"])
    if pretrained_acc is not None:
        ax.axhline(100 * pretrained_acc, ls="--", color="0.4", lw=1, label="pretrained")
        shown.append(100 * pretrained_acc)
    for index, (px, py, text) in enumerate(_point_labels(data, x, "acc_pct")):
        ax.annotate(
            text,
            (px, py),
            textcoords="offset points",
            xytext=(5, 6 if index % 2 == 0 else -11),
            fontsize=7,
        )
    ax.set_ylim(*accuracy_limits(shown))
    log_axis(ax, list(data[x]))
    ax.set_xlabel("unique values among fixed weights")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(fitted_title(title, fig), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gaussian_scatter(snapshot: dict, path: Path, title: str) -> Path:
    """The (mu, sigma) points coloured by Gaussian, outliers in grey, and the 95 % ellipses of
    the :data:`ELLIPSES_SHOWN` most populated Gaussians (every mean is marked)."""
    from matplotlib.collections import EllipseCollection

    points = snapshot["points"].numpy()[:POINTS_SHOWN]
    labels = snapshot["labels"].numpy()[:POINTS_SHOWN]
    means = snapshot["means"].numpy()
    covariances = snapshot["covariances"].numpy()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    outliers = labels < 0
    ax.scatter(*points[outliers].T, s=3, c="0.65", label="outliers", rasterized=True)
    ax.scatter(
        *points[~outliers].T,
        s=2,
        c=labels[~outliers] % 20,
        cmap="tab20",
        alpha=0.5,
        rasterized=True,
    )
    ax.scatter(*means.T, s=6, marker="x", c="k", linewidths=0.5, label="Gaussian means")
    members = np.bincount(labels[~outliers], minlength=len(means))
    largest = np.argsort(members)[::-1][:ELLIPSES_SHOWN]
    values, vectors = np.linalg.eigh(covariances[largest])
    radius = np.sqrt(5.991 * np.clip(values, 0, None))  # 95 % of a 2-D Gaussian
    angles = np.degrees(np.arctan2(vectors[:, 1, 1], vectors[:, 0, 1]))
    ax.add_collection(
        EllipseCollection(
            2 * radius[:, 1],
            2 * radius[:, 0],
            angles,
            units="xy",
            offsets=means[largest],
            offset_transform=ax.transData,
            facecolors="none",
            edgecolors="C3",
            linewidths=0.8,
        )
    )
    ax.set_xlabel("mu")
    ax.set_ylabel("sigma")
    drawn = min(ELLIPSES_SHOWN, len(means))
    caption = f"{len(means)} Gaussians; 95 % ellipses of the {drawn} largest"
    ax.set_title(fitted_title(f"{title}\n{caption}", fig), fontsize=10)
    ax.legend(fontsize=8, loc="upper right", markerscale=3)
    return _save(fig, path)


def draw_figure(figure: Figure, path: Path, title: str) -> Path:
    """Draw a method's figure by its kind.

    Raises:
        KeyError: for a kind nothing here draws.
    """
    return FIGURE_KINDS[figure.kind](figure.data, path, title)


# A bin of fewer test samples has a resolution coarser than 10 points: drawn faded, no gap.
SPARSE_BIN = 10


def draw_reliability(ax: Axes, bins: dict[str, list[float]], title: str) -> None:
    """Accuracy per confidence bin with its 95 % binomial interval (Clopper-Pearson); bins of
    fewer than :data:`SPARSE_BIN` samples faded, without a gap drawn (too few to show
    miscalibration); every bin's count written over it, the legend below the axes."""
    width = bins["upper"][0] - bins["lower"][0]
    for i, count in enumerate(bins["count"]):
        if count <= 0:
            continue
        left, accuracy, confidence = bins["lower"][i], bins["accuracy"][i], bins["confidence"][i]
        sparse = count < SPARSE_BIN
        ax.bar(
            left,
            accuracy,
            width=width,
            align="edge",
            color="C0",
            edgecolor="C0",
            alpha=0.18 if sparse else 0.7,
        )
        if not sparse:
            ax.bar(
                left,
                confidence - accuracy,
                bottom=accuracy,
                width=width,
                align="edge",
                fill=False,
                hatch="//",
                edgecolor="C3",
                lw=0.5,
            )
        interval = stats.binomtest(round(accuracy * count), int(count)).proportion_ci(0.95)
        centre = left + width / 2
        ax.plot([centre, centre], [interval.low, interval.high], color="0.25", lw=0.8)
        ax.text(
            centre,
            min(max(accuracy, confidence, interval.high) + 0.015, 1.02),
            f"{int(count)}",
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="0.45" if sparse else "0.1",
            rotation=90 if count >= 1000 else 0,
        )
    ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("confidence (numbers: test samples per bin)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    handles = [
        Patch(color="C0", alpha=0.7, label="accuracy"),
        Patch(color="C0", alpha=0.18, label=f"< {SPARSE_BIN} samples"),
        Patch(fill=False, hatch="//", edgecolor="C3", label="gap to confidence"),
        Line2D([], [], color="0.25", lw=0.8, label="95 % interval"),
    ]
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=2,
        frameon=False,
    )


def reliability_diagram(
    bins: dict[str, list[float]], path: Path, title: str, ece: float | None = None
) -> Path:
    """One run's reliability diagram (:func:`draw_reliability`), its ECE in the title."""
    fig, ax = plt.subplots(figsize=(4.8, 5.4))  # the legend sits below the axes
    full = title if ece is None else f"{title}\nECE {ece:.4f}"
    draw_reliability(ax, bins, fitted_title(full, fig, 9))
    return _save(fig, path)


def pareto_front(
    trials: pd.DataFrame,
    path: Path,
    title: str,
    reference_acc: float | None = None,
    cost: str = "unique_values",
    cost_label: str = "unique values",
) -> Path:
    """Accuracy against a cost (unique values, NLL, ...) for every trial (numbered), the Pareto
    front joined."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    others = trials[~trials["pareto"]]
    front = trials[trials["pareto"]].sort_values(cost)
    ax.scatter(others[cost], 100 * others["accuracy"], alpha=0.5, label="trials")
    ax.plot(front[cost], 100 * front["accuracy"], "o-", color="C3", label="Pareto front")
    for _, row in trials.iterrows():
        ax.annotate(
            f"#{int(row['trial'])}",
            (row[cost], 100 * row["accuracy"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    shown = list(100 * trials["accuracy"])
    if reference_acc is not None:
        ax.axhline(100 * reference_acc, ls="--", color="0.4", lw=1, label="pretrained")
        shown.append(100 * reference_acc)
    ax.set_ylim(*accuracy_limits(shown))
    log_axis(ax, list(trials[cost]))
    ax.set_xlabel(cost_label)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(fitted_title(title, fig), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: Path, title: str, xlabel: str) -> Path:
    """Horizontal bars, largest on top (parameter importances)."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(items) + 1.6))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel(xlabel)
    ax.set_title(fitted_title(title, fig), fontsize=10)
    return _save(fig, path)


# What each kind of method figure is drawn with (kinds are types of plots, not methods).
FIGURE_KINDS = {"gaussian_mixture": gaussian_scatter}
