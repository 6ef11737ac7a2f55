"""Figures logged with runs (matplotlib, headless).

Accuracy axes are in percent and never claim more than 100 %; a small spread is shown on an
axis at least :data:`MIN_SPAN` points tall, so a 0.2-point wobble does not fill the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

from pwf_core._files import atomic_path

MIN_SPAN = 5.0  # percentage points


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


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


def _point_labels(rounds: pd.DataFrame, x: str, y: str) -> list[tuple[float, float, str]]:
    """One label per distinct point: rounds that land on the same point share it ("r8-10")."""
    labels = []
    for (px, py), group in rounds.groupby([x, y], sort=False):
        numbers = sorted(int(r) for r in group["round"])
        text = f"r{numbers[0]}" if len(numbers) == 1 else f"r{numbers[0]}-{numbers[-1]}"
        labels.append((px, py, text))
    return labels


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
    ax.set_xscale("log")
    ax.set_xlabel("unique values among fixed weights (log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gaussian_scatter(snapshot: dict, path: Path, title: str) -> Path:
    """The (mu, sigma) points coloured by Gaussian, outliers in grey, and every Gaussian's 95 %
    ellipse."""
    import numpy as np
    from matplotlib.collections import EllipseCollection

    points = snapshot["points"].numpy()
    labels = snapshot["labels"].numpy()
    means = snapshot["means"].numpy()
    covariances = snapshot["covariances"].numpy()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    outliers = labels < 0
    ax.scatter(*points[outliers].T, s=3, c="0.6", label="outliers", rasterized=True)
    ax.scatter(*points[~outliers].T, s=2, c=labels[~outliers] % 20, cmap="tab20", rasterized=True)
    values, vectors = np.linalg.eigh(covariances)
    radius = np.sqrt(5.991 * np.clip(values, 0, None))  # 95 % of a 2-D Gaussian
    angles = np.degrees(np.arctan2(vectors[:, 1, 1], vectors[:, 0, 1]))
    ellipses = EllipseCollection(
        2 * radius[:, 1],
        2 * radius[:, 0],
        angles,
        units="xy",
        offsets=means,
        offset_transform=ax.transData,
        facecolors="none",
        edgecolors="k",
        linewidths=0.4,
    )
    ax.add_collection(ellipses)
    ax.set_xlabel("mu")
    ax.set_ylabel("sigma")
    ax.set_title(f"{title}\n{len(means)} Gaussians, 95 % ellipses", fontsize=10)
    ax.legend(fontsize=8, loc="upper right", markerscale=3)
    return _save(fig, path)


def draw_figure(figure, path: Path, title: str) -> Path:
    """Draw a method's figure (:class:`pwf_core.methods.Figure`) by its kind.

    Raises:
        KeyError: for a kind nothing here draws.
    """
    return FIGURE_KINDS[figure.kind](figure.data, path, title)


def reliability_diagram(bins: dict[str, list[float]], path: Path, title: str) -> Path:
    """Accuracy against confidence per bin (bars) with the diagonal of perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    width = bins["upper"][0] - bins["lower"][0]
    filled = [i for i, n in enumerate(bins["count"]) if n > 0]
    ax.bar(
        [bins["lower"][i] for i in filled],
        [bins["accuracy"][i] for i in filled],
        width=width,
        align="edge",
        edgecolor="C0",
        alpha=0.7,
        label="accuracy",
    )
    ax.bar(
        [bins["lower"][i] for i in filled],
        [bins["confidence"][i] - bins["accuracy"][i] for i in filled],
        bottom=[bins["accuracy"][i] for i in filled],
        width=width,
        align="edge",
        fill=False,
        hatch="//",
        edgecolor="C3",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
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
    ax.set_xscale("log")
    ax.set_xlabel(f"{cost_label} (log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: Path, title: str, xlabel: str) -> Path:
    """Horizontal bars, largest on top (parameter importances)."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(items) + 1.6))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


# What each kind of method figure is drawn with (kinds are types of plots, not methods).
FIGURE_KINDS = {"gaussian_mixture": gaussian_scatter}
