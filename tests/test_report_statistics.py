"""``pwf report``'s statistics against numbers computed here, independently, with scipy from the
metrics a real MLflow SQLite store holds: per-setting means, sd, n and Student-t intervals; the
budget table and the paired comparison (paired t, Wilcoxon); what is left out (sweeps' and
trials' aggregate runs, an older run of a replicate that was run again, unfinished runs); the
knobs as resolved; the CSV, Markdown and LaTeX files; the figures' labels and sparse bins."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from pwf_flows import infra
from pwf_flows.cli import main as pwf_main
from pwf_flows.plots import SPARSE_BIN
from pwf_flows.report import Selection, build_report
from pwf_flows.report.collect import ReportError
from pwf_flows.report.figures import FrontFigure, reliability_grid

N_TEST = 359  # the digits test split: one sample is 100 / 359 = 0.28 pt
PRETRAINED = 355 / N_TEST
SWEEP = "bench"
# What pwf report writes: the page, its figures, and each table as CSV, Markdown and LaTeX.
REPORT_FILES = {
    "report.html",
    "front.png",
    "reliability.png",
    "table.csv",
    "table.md",
    "table.tex",
    "comparison.csv",
    "runs.csv",
    "stats.csv",
}
# One entry per setting: knobs as a run resolves them, per replicate the test samples right,
# the shared values (and outliers); "seed" is the base seed (default "0").
SETTINGS = {
    "kmeans-8": {"knobs": {"clusters": "8"}, "right": [339, 340, 338], "shared": [8, 8, 8]},
    "kmeans-16": {"knobs": {"clusters": "16"}, "right": [347, 348, 345], "shared": [16] * 3},
    "kmeans-32": {"knobs": {"clusters": "32"}, "right": [350, 352, 349], "shared": [32] * 3},
    "pwfn-4": {
        "knobs": {"b": "4", "max_order": "4"},
        "right": [349, 350, 348],
        "shared": [11, 12, 13],
    },
    "pwfn-5": {
        "knobs": {"b": "5", "max_order": "4"},
        "right": [353, 354, 352],
        "shared": [28, 30, 31],
    },
    "pwfn-6": {
        "knobs": {"b": "6", "max_order": "4"},
        "right": [354, 355, 354],
        "shared": [100, 110, 105],
    },
    "2dgbnn-12": {
        "knobs": {"gaussians": "12", "tau_d": "0.015"},
        "right": [351, 349, 350],
        "shared": [12, 11, 12],
        "outliers": [20, 22, 19],
    },
    "uniform-3": {"knobs": {"bits": "3"}, "right": [333, 334], "shared": [8, 8]},
    "wfn-5": {"knobs": {"b": "5", "delta": "0.015"}, "right": [352], "shared": [40], "seed": "1"},
}
BINS = {  # 15 bins; the low ones hold 1-4 samples
    "lower": [i / 15 for i in range(15)],
    "upper": [(i + 1) / 15 for i in range(15)],
    "confidence": [(i + 0.5) / 15 for i in range(15)],
    "accuracy": [0, 0, 0, 0, 0, 0, 1.0, 0, 0.5, 0.25, 0, 0.6, 0.75, 0.9, 0.99],
    "count": [0, 0, 0, 0, 0, 0, 1, 0, 2, 4, 0, 5, 12, 30, 305],
}


def _method(setting: str) -> str:
    return setting.split("-")[0]


def _log(client, run_id, metrics, params=None, tags=None):
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


def _final(right: int, shared: float, outliers: float, stochastic: bool, jitter: int) -> dict:
    acc = right / N_TEST
    metrics = {
        "cls/acc": acc,
        "cls/acc5": 1.0,
        "cls/nll": 0.05 + 0.01 * jitter,
        "cal/ece": 0.010 + 0.002 * jitter,
        "cal/brier": 0.02,
        "ws/unique_values": shared + outliers,
        "ws/shared_values": shared,
        "ws/outliers": outliers,
        "ws/entropy_bits": 3.0 + 0.1 * jitter,
        "size/file_bytes": 5000.0 + 10 * shared,
        "mean/cls/acc": acc,
        "data/test_samples": float(N_TEST),
    }
    if stochastic:
        metrics |= {"sampled/cls/acc": acc - 1 / N_TEST, "sampled/cal/ece": 0.02}
    return {f"final/{k}": v for k, v in metrics.items()}


def _experiment_run(client, eid, parent, setting, replicate, start, right=None, status="FINISHED"):
    spec = SETTINGS[setting]
    method, seed = _method(setting), spec.get("seed", "0")
    outliers = spec.get("outliers", [0] * len(spec["right"]))[replicate]
    run = client.create_run(
        eid,
        start_time=start,
        run_name=f"{method} r{replicate}",
        tags={"mlflow.parentRunId": parent} if parent else {},
    )
    metrics = _final(
        spec["right"][replicate] if right is None else right,
        spec["shared"][replicate],
        outliers,
        method == "2dgbnn",
        replicate,
    )
    params = {
        "seed": seed,
        "replicate.index": replicate,
        "replicate.reseeds": "compression",
        "compression.method": method,
        **{f"knob.{k}": v for k, v in spec["knobs"].items()},
    }
    tags = {
        "kind": "experiment",
        "method": method,
        "model": "small_cnn",
        "dataset": "digits",
        "setting": f"{setting}-key",
        "replicate": str(replicate),
        "run_key": f"{setting}-{replicate}",
    }
    _log(client, run.info.run_id, {**metrics, "pretrain/test_acc": PRETRAINED}, params, tags)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def make_store(folder: Path) -> str:
    """A sweep of every setting above: trial runs (aggregates) over replicate runs, one setting
    run straight under the sweep; an older run of one replicate, a failed run, a run that ended
    without final metrics (stopped early). Returns the store's URI."""
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment(SWEEP, artifact_location=str(folder / "artifacts"))
    parent = client.create_run(eid, run_name="sweep", tags={"kind": "sweep"}).info.run_id
    bins = folder / "reliability.json"
    bins.write_text(json.dumps(BINS))
    start = 1_700_000_000_000
    for number, (setting, spec) in enumerate(SETTINGS.items()):
        n = len(spec["right"])
        trial = None
        if n > 1:  # a trial with replicates: its aggregate run, the replicates below it
            trial = client.create_run(eid, run_name=f"trial {number}", start_time=start)
            trial_id = trial.info.run_id
            mean = float(np.mean(spec["right"])) / N_TEST
            tags = {"kind": "trial", "mlflow.parentRunId": parent, "method": _method(setting)}
            _log(client, trial_id, {"final/cls/acc": mean, "final/ws/unique_values": 1.0}, {}, tags)
            client.set_terminated(trial_id)
        for replicate in range(n):
            start += 1000
            run_id = _experiment_run(
                client, eid, trial_id if trial else parent, setting, replicate, start
            )
            if setting in ("kmeans-32", "pwfn-5"):
                client.log_artifact(run_id, str(bins), "tables")
    # kmeans-32 replicate 1 ran before (a --fresh rerun replaced it): only the newest counts
    _experiment_run(client, eid, parent, "kmeans-32", 1, 1_600_000_000_000, right=300)
    _experiment_run(client, eid, parent, "pwfn-5", 0, start + 5000, right=100, status="FAILED")
    stopped = client.create_run(eid, tags={"mlflow.parentRunId": parent, "kind": "experiment"})
    client.log_metric(stopped.info.run_id, "cls/acc", 0.5)
    client.set_terminated(stopped.info.run_id)
    client.set_terminated(parent)
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("report-stats")
    return folder, make_store(folder)


# -- what the test computes itself, from the store ------------------------------------------


def expected_settings(uri: str) -> dict[str, list]:
    """The finished experiment runs by setting tag, one per (seed, replicate): the newest."""
    client = MlflowClient(uri)
    eid = client.get_experiment_by_name(SWEEP).experiment_id
    newest: dict[tuple, object] = {}
    for run in client.search_runs([eid], max_results=1000):
        tags, params = run.data.tags, run.data.params
        if tags.get("kind") != "experiment" or run.info.status != "FINISHED":
            continue
        if "final/cls/acc" not in run.data.metrics:
            continue
        key = (tags["setting"], params["seed"], params["replicate.index"])
        if key not in newest or newest[key].info.start_time < run.info.start_time:
            newest[key] = run
    grouped: dict[str, list] = {}
    for (setting, _, _), run in sorted(newest.items()):
        grouped.setdefault(setting.removesuffix("-key"), []).append(run)
    return grouped


def t_interval(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sd (ddof=1), and the Student-t 95 % interval, from the textbook formula with
    scipy's t quantile."""
    values = np.asarray(values, dtype=float)
    n, mean, sd = len(values), float(np.mean(values)), float(np.std(values, ddof=1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def acc(run) -> float:
    return run.data.metrics["final/cls/acc"]


def shared(run) -> float:
    return run.data.metrics["final/ws/shared_values"]


def best_within(grouped: dict[str, list], method: str, budget: int) -> str | None:
    within = [
        s
        for s, runs in grouped.items()
        if _method(s) == method and np.mean([shared(r) for r in runs]) <= budget
    ]
    return max(within, key=lambda s: np.mean([acc(r) for r in grouped[s]]), default=None)


def by_pair(runs) -> dict[tuple, float]:
    return {(r.data.params["seed"], r.data.params["replicate.index"]): acc(r) for r in runs}


def run_pwf(monkeypatch, argv: list[str]) -> int:
    """``pwf ARGV`` in this process (a new one costs seconds of imports), with what the command
    sets for its process (environment defaults, the outage budget) undone afterwards."""
    monkeypatch.setattr(infra, "_timeout_s", infra.infra_timeout_s())
    saved = set(os.environ)
    try:
        return pwf_main(argv)
    finally:
        for key in set(os.environ) - saved:
            del os.environ[key]


def _report(uri: str, **kwargs):
    return build_report(MlflowClient(uri), Selection(sweep=SWEEP), "t", "test", **kwargs)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- the tests ------------------------------------------------------------------------------


def test_each_setting_is_summarised_as_scipy_computes_it_from_the_store(store):
    _, uri = store
    grouped = expected_settings(uri)
    report = _report(uri, reference="kmeans")
    (settings,) = report.settings.values()
    assert {s.key.removesuffix("-key") for s in settings} == set(SETTINGS) == set(grouped)
    # trials' aggregates, the failed run, the stopped run and the older rerun are not counted
    assert len(report.runs) == sum(len(s["right"]) for s in SETTINGS.values()) == 24
    rows = {row["setting"]: row for row in _rows(report.csv)}
    for setting in settings:
        runs = grouped[setting.key.removesuffix("-key")]
        assert setting.n == len(runs) == int(rows[setting.key]["n"])
        for key in ("cls/acc", "cal/ece", "ws/unique_values", "ws/shared_values"):
            values = [r.data.metrics[f"final/{key}"] for r in runs]
            summary = setting.stats[key]
            assert summary.n == len(values)
            assert summary.mean == pytest.approx(np.mean(values), abs=1e-12)
            if len(values) == 1:
                assert math.isnan(summary.sd) and math.isnan(summary.low)
                continue
            _, sd, low, high = t_interval(values)
            assert (summary.sd, summary.low, summary.high) == pytest.approx((sd, low, high))
        row = rows[setting.key]
        top1 = [acc(r) for r in runs]
        assert float(row["top-1 (%) mean"]) == pytest.approx(100 * np.mean(top1))
        delta = [acc(r) - r.data.metrics["pretrain/test_acc"] for r in runs]
        assert float(row["Δ top-1 vs pretrained (pt) mean"]) == pytest.approx(100 * np.mean(delta))
        if len(runs) > 1:
            assert float(row["top-1 (%) 95% CI high"]) == pytest.approx(100 * t_interval(top1)[3])
        else:
            assert row["top-1 (%) 95% CI high"] == ""
        sampled = row["sampled top-1 (%) mean"]
        assert (sampled != "") == (setting.method == "2dgbnn")  # fixed models report none
    kmeans32 = next(s for s in settings if s.key == "kmeans-32-key")
    assert kmeans32.dropped == 1 and 300 / N_TEST not in [
        r.metric("cls/acc") for r in kmeans32.runs
    ]
    every = {line["metric"] for line in _rows(report.files["stats.csv"])}
    assert {"cls/acc5", "cal/brier", "mean/cls/acc", "size/file_bytes"} <= every


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # equal differences
def test_budget_table_and_paired_tests_equal_scipys_on_the_shared_seeds(store):
    _, uri = store
    grouped = expected_settings(uri)
    report = _report(uri, reference="kmeans", budgets=(8, 16, 32, 64))
    rows = _rows(report.files["comparison.csv"])
    methods = sorted({_method(s) for s in SETTINGS})
    assert [(int(r["K (values at most)"]), r["method"]) for r in rows] == [
        (k, m) for k in (8, 16, 32, 64) for m in ["kmeans"] + [m for m in methods if m != "kmeans"]
    ]
    checked = {"tested": 0, "no seeds": 0, "missing": 0}
    for row in rows:
        budget, method = int(row["K (values at most)"]), row["method"]
        best = best_within(grouped, method, budget)
        anchor = best_within(grouped, "kmeans", budget)
        if best is None:
            assert row["top-1 (%) mean"] == "" and row["verdict"].startswith("no setting within")
            checked["missing"] += 1
            continue
        runs = grouped[best]
        assert float(row["top-1 (%) mean"]) == pytest.approx(100 * np.mean([acc(r) for r in runs]))
        assert float(row["shared values mean"]) == pytest.approx(np.mean([shared(r) for r in runs]))
        if method == "kmeans":
            assert row["verdict"] == "reference" and row["p (paired t)"] == ""
            continue
        mine, theirs = by_pair(runs), by_pair(grouped[anchor])
        pairs = sorted(set(mine) & set(theirs))
        assert int(row["pairs"]) == len(pairs)
        if not pairs:
            assert row["verdict"] == "n/a, no shared seeds" and row["p (Wilcoxon)"] == ""
            checked["no seeds"] += 1
            continue
        a = np.array([mine[p] for p in pairs])
        b = np.array([theirs[p] for p in pairs])
        test = stats.ttest_rel(a, b)
        _, _, low, high = t_interval(list(a - b))
        assert float(row["Δ top-1 vs reference (pt)"]) == pytest.approx(100 * np.mean(a - b))
        assert float(row["Δ 95% CI low (pt)"]) == pytest.approx(100 * low)
        assert float(row["Δ 95% CI high (pt)"]) == pytest.approx(100 * high)
        assert float(row["p (paired t)"]) == pytest.approx(test.pvalue)
        assert float(row["p (Wilcoxon)"]) == pytest.approx(stats.wilcoxon(a, b).pvalue)
        if np.all(a - b == (a - b)[0]):
            verdict = f"by the same Δ on all {len(pairs)} pairs"  # sd 0: t says nothing
        elif test.pvalue >= 0.05:
            verdict = f"not significant at n = {len(pairs)}"
        else:
            verdict = f"significant at n = {len(pairs)}"
        assert verdict in row["verdict"], row
        checked["tested"] += 1
    assert checked["tested"] >= 6 and checked["no seeds"] >= 1 and checked["missing"] >= 3
    # pwfn b=5 against k-means with 32 values: 3 pairs, +3, +2 and +3 samples
    row = next(r for r in rows if r["method"] == "pwfn" and r["K (values at most)"] == "32")
    assert float(row["Δ top-1 vs reference (pt)"]) == pytest.approx(100 * 8 / 3 / N_TEST)
    assert row["knobs"] == "b=5, max_order=4"


def test_the_reference_defaults_to_the_first_method_and_must_exist(store):
    _, uri = store
    report = _report(uri)
    assert report.reference == "2dgbnn"
    assert "against <strong>2dgbnn</strong> (the first method in this report;" in report.html
    first = _rows(report.files["comparison.csv"])[0]
    assert (first["method"], first["verdict"]) == ("2dgbnn", "no setting within 8 values")
    with pytest.raises(ReportError, match="--reference 'nope' has no run in this report"):
        _report(uri, reference="nope")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--reference", "nope"], "pwf: --reference 'nope' has no run in this report; its meth"),
        (["--budgets", "8,x"], "pwf: --budgets '8,x': give counts of values as positive whole"),
        (["--budgets", "0"], "pwf: --budgets '0'"),
    ],
)
def test_bad_flags_end_in_one_line_and_write_nothing(
    store, tmp_path, capsys, monkeypatch, argv, expected
):
    _, uri = store
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    argv = ["report", "--sweep", SWEEP, "--tracking-uri", uri, "--out", str(out), *argv]
    code = run_pwf(monkeypatch, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert not out.exists()


def test_the_files_carry_the_same_columns_and_a_booktabs_table(
    store, tmp_path, capsys, monkeypatch
):
    _, uri = store
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    code = run_pwf(
        monkeypatch,
        [
            "report",
            "--sweep",
            SWEEP,
            "--tracking-uri",
            uri,
            "--out",
            str(out),
            "--reference",
            "kmeans",
            "--budgets",
            "16,32",
        ],
    )
    printed = capsys.readouterr().out
    assert code == 0 and "24 runs in 9 settings, against kmeans" in printed
    assert "  reliability: " in printed  # a space after every name
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    markdown = (out / "table.md").read_text()
    tables = [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    for name in ("table.csv", "comparison.csv", "runs.csv"):
        header = next(csv.reader((out / name).open()))
        assert [c.strip() for c in header] in tables, name  # the Markdown table has its columns
    assert "one test sample = 0.28 pt, n = 359" in markdown
    tex = (out / "table.tex").read_text()
    assert tex.count("\\toprule") == tex.count("\\bottomrule") == 2 and "\\midrule" in tex
    assert "\\begin{table}" in tex and "\\caption{" in tex
    grouped = expected_settings(uri)
    top1 = [100 * acc(r) for r in grouped["pwfn-5"]]
    mean, _, low, high = t_interval(top1)
    cell = f"${mean:.2f} \\pm {(high - low) / 2:.2f}$"
    line = next(x for x in tex.splitlines() if x.startswith("pwfn & b=5, max\\_order=4"))
    assert cell in line and " & 3 & " in line
    assert re.search(r"\$\\le 16\$ & \$\\le 32\$", tex)  # the budget table's columns


def test_knobs_show_as_resolved_and_older_runs_fall_back_to_their_config(store):
    _, uri = store
    client = MlflowClient(uri)
    eid = client.create_experiment("old")
    for method, params in (
        ("pwfn", {"compression.b": "auto", "compression.max_order": "4", "compression.reg": "1"}),
        ("kmeans", {"compression.clusters": "32", "compression.iterations": "25"}),
        ("pwfn", {"knob.b": "5", "knob.max_order": "4", "compression.b": "auto"}),
    ):
        run = client.create_run(eid, tags={"method": method, "dataset": "digits"})
        _log(
            client,
            run.info.run_id,
            {"final/cls/acc": 0.9, "final/ws/unique_values": 30},
            {"compression.method": method, **params},
        )
        client.set_terminated(run.info.run_id)
    report = build_report(client, Selection(experiments=("old",)), "t", "test")
    knobs = [run.knobs for run in report.runs]
    assert {"b": "5", "max_order": "4"} in knobs  # knob.*: as the run resolved them
    assert {"b": "auto", "max_order": "4"} in knobs  # an older run: its size knobs as configured
    assert {"clusters": "32"} in knobs
    # older runs carry no setting: each its own, n = 1, with the warning and no resolution
    assert all(s.n == 1 for s in report.settings["? on digits"])
    assert 'id="few-replicates"' in report.html and "did not record their test split" in report.html


def test_front_labels_stay_inside_the_axes_and_sparse_bins_are_faded(store):
    _, uri = store
    report = _report(uri, reference="kmeans")
    runs = {panel: [r for r in report.runs] for panel in report.settings}
    figure = FrontFigure(report.settings, runs)
    try:
        ((ax, labels),) = figure.annotations
        renderer = figure.fig.canvas.get_renderer()
        frame = ax.get_window_extent(renderer)
        texts = [label.get_text() for label in labels]
        assert "pwfn b=5, max_order=4" in texts and "kmeans clusters=32" in texts
        for label in labels:
            box = label.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1, label.get_text()
            assert frame.y0 <= box.y0 and box.y1 <= frame.y1, label.get_text()
            assert label.get_fontsize() >= 8
        assert ax.get_xlabel() == "unique values (log scale)" and ax.get_xscale() == "log"
        assert ax.get_title() == "small_cnn on digits"
        # error bars on both axes for a setting of three replicates
        assert len([c for c in ax.containers if c.has_xerr and c.has_yerr]) == len(SETTINGS)
    finally:
        figure.close()
    setting = next(s for s in report.settings["small_cnn on digits"] if s.key == "pwfn-5-key")
    png, svg = reliability_grid([(setting, BINS)])
    assert png.startswith(b"\x89PNG") and "pwfn b=5, max_order=4" in svg
    import matplotlib.pyplot as plt

    from pwf_flows.plots import draw_reliability

    fig, ax = plt.subplots()
    try:
        draw_reliability(ax, BINS, "t")
        bars = [p for p in ax.patches if p.get_fill()]
        faded = [p for p in bars if p.get_alpha() < 0.5]
        sparse = [c for c in BINS["count"] if 0 < c < SPARSE_BIN]
        assert len(faded) == len(sparse) and len(bars) == len([c for c in BINS["count"] if c])
        counts = [t for t in ax.texts if t.get_text().isdigit()]
        assert sorted(int(t.get_text()) for t in counts) == sorted(c for c in BINS["count"] if c)
        assert all(t.get_fontsize() >= 7.5 for t in counts)
        legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
        assert legend.y1 <= ax.get_window_extent(fig.canvas.get_renderer()).y0  # below the axes
    finally:
        plt.close(fig)


def test_a_collapsed_setting_sits_on_the_floor_and_leaves_the_others_readable(
    tmp_path, monkeypatch
):
    """3-bit uniform at 12.5 %: drawn on the axis floor with its top-1 written out, while the
    axis spans the settings within 10 points of the pretrained model."""
    monkeypatch.setitem(
        SETTINGS, "uniform-3", {"knobs": {"bits": "3"}, "right": [45, 40, 50], "shared": [6] * 3}
    )
    report = _report(make_store(tmp_path))
    runs = {panel: list(report.runs) for panel in report.settings}
    figure = FrontFigure(report.settings, runs)
    try:
        ((ax, labels),) = figure.annotations
        low, high = ax.get_ylim()
        lowest_kept = min(min(s["right"]) for k, s in SETTINGS.items() if k != "uniform-3")
        assert 100 * 300 / N_TEST < low <= 100 * lowest_kept / N_TEST and high <= 100
        (below,) = [label for label in labels if label.get_text().endswith("below")]
        assert below.get_text() == f"uniform bits=3: {100 * 45 / N_TEST:.1f} %, below"
        assert below.xy == (6.0, low)  # on the floor, at its unique values
        renderer = figure.fig.canvas.get_renderer()
        frame = ax.get_window_extent(renderer)
        box = below.get_window_extent(renderer)
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1
    finally:
        figure.close()


def test_when_many_settings_are_far_below_the_whole_range_is_shown(tmp_path, monkeypatch):
    """A quarter of the settings or more far below the best is the picture itself: the axis
    reaches down to them and nothing sits on the floor."""
    for bits, right in (("2", [30, 31, 32]), ("3", [45, 40, 50]), ("4", [60, 61, 62])):
        knobs = {"knobs": {"bits": bits}, "right": right, "shared": [3] * 3}
        monkeypatch.setitem(SETTINGS, f"uniform-{bits}", knobs)
    report = _report(make_store(tmp_path))
    runs = {panel: list(report.runs) for panel in report.settings}
    figure = FrontFigure(report.settings, runs)
    try:
        ((ax, labels),) = figure.annotations
        assert ax.get_ylim()[0] <= 100 * 30 / N_TEST
        assert not [label for label in labels if label.get_text().endswith("below")]
    finally:
        figure.close()
