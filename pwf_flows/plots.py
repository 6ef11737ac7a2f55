"""Figures logged with runs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

from pwf_core.checkpoint import atomic_path


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_unique_values(rounds: pd.DataFrame, path: Path, title: str) -> Path:
    """Top-1 accuracy against the number of unique values, one point per round."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds["ws/unique_values"], 100 * rounds["cls/acc"], marker="o")
    for _, row in rounds.iterrows():
        ax.annotate(
            f"{row['fraction']:.0%}",
            (row["ws/unique_values"], 100 * row["cls/acc"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("unique values among converted weights (log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto_front(trials: pd.DataFrame, path: Path, title: str) -> Path:
    """Accuracy against unique values for every trial, the Pareto front highlighted."""
    fig, ax = plt.subplots(figsize=(6, 4))
    others = trials[~trials["pareto"]]
    front = trials[trials["pareto"]].sort_values("unique_values")
    ax.scatter(others["unique_values"], 100 * others["accuracy"], alpha=0.5, label="trials")
    ax.plot(front["unique_values"], 100 * front["accuracy"], "o-", color="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("unique values (log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars, largest on top (parameter importances)."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_title(title)
    return _save(fig, path)
