"""Figures a researcher can read: honest accuracy ranges, labels that do not pile up."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from pwf_flows.plots import (
    _point_labels,
    accuracy_limits,
    accuracy_vs_unique_values,
    log_axis,
    pareto_front,
    plain_number,
    reliability_diagram,
    round_label,
)


def test_a_small_spread_gets_an_honest_axis():
    low, high = accuracy_limits([99.0, 99.2, 99.16])
    assert high - low >= 5.0 and low <= 99.0 and high <= 100.0
    assert accuracy_limits([99.9, 100.0])[1] == 100.0  # never above 100 %
    low, high = accuracy_limits([20.0, 90.0])  # a real spread is shown, with a margin
    assert low < 20.0 and high > 90.0 and high <= 100.0


def test_rounds_on_the_same_point_share_one_label_that_reads_as_what_it_is():
    rounds = pd.DataFrame(
        {"round": [1, 2, 3, 4], "x": [5, 20, 38, 38], "y": [99.1, 99.2, 99.16, 99.16]}
    )
    assert [text for _, _, text in _point_labels(rounds, "x", "y")] == ["r1", "r2", "r3–r4"]
    assert round_label([1, 3]) == "r1, r3"  # two rounds, not the range 1 to 3
    assert round_label([8, 9, 10]) == "r8–r10"


def test_log_axes_have_plain_tick_labels():
    import matplotlib.pyplot as plt

    assert [plain_number(v) for v in (20, 300, 2000, 0.5)] == ["20", "300", "2,000", "0.5"]
    fig, ax = plt.subplots()
    ax.plot([12, 40, 300], [1, 2, 3])
    log_axis(ax, [12, 40, 300])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ax.get_xscale() == "log" and "20" in labels and "100" in labels
    assert not any("10^" in label or "times" in label for label in labels)
    _, ax2 = plt.subplots()
    log_axis(ax2, [20, 38])  # less than a decade: stays linear
    assert ax2.get_xscale() == "linear"
    plt.close("all")


def test_figures_are_written(tmp_path):
    rounds = pd.DataFrame(
        {
            "round": [1, 2, 3],
            "fraction": [0.5, 0.8, 1.0],
            "ws/unique_fixed_values": [1, 21, 25],
            "cls/acc": [0.94, 0.958, 0.947],
        }
    )
    path = accuracy_vs_unique_values(rounds, tmp_path / "a.png", "run x", pretrained_acc=0.97)
    trials = pd.DataFrame(
        {"trial": [0, 1], "accuracy": [0.99, 0.98], "unique_values": [40, 20], "pareto": [1, 1]}
    ).astype({"pareto": bool})
    front = pareto_front(trials, tmp_path / "p.png", "sweep", reference_acc=0.995)
    bins = {
        "lower": [i / 15 for i in range(15)],
        "upper": [(i + 1) / 15 for i in range(15)],
        "confidence": [0.0] * 14 + [0.98],
        "accuracy": [0.0] * 14 + [0.97],
        "count": [0] * 14 + [359],
    }
    diagram = reliability_diagram(bins, tmp_path / "r.png", "run x")
    for written in (path, front, diagram):
        assert Image.open(written).size[0] > 300
