"""``pwf report`` and the views a researcher clicks through: a real sweep of every method (the
shipped methods sweep on a tiny base: real runs of the experiment flow) in a real MLflow store
and Prefect server, its report read as files, through MLflow's and Prefect's APIs, and in a
real headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from scipy import stats

from pwf_flows.cli import main as pwf_main
from pwf_flows.links import TRAINING_VIEW
from tests._dummies.browser import chromium
from tests._dummies.services import free_port
from tests.conftest import ROOT
from tests.test_report_page import assert_no_wrapped_cells
from tests.test_report_statistics import REPORT_FILES, run_pwf
from tests.test_shipped_sweeps import tiny_overrides

# One worker runs this module (make test's --dist loadfile): its tests share one sweep.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # the first test waits for the sweep: 60 tiny runs
]
METHODS = ROOT / "sweeps" / "methods.yaml"
SCREENSHOT = ROOT / "docs" / "report.png"
REFERENCE = "pwfn"


@pytest.fixture(scope="module")
def methods_sweep(tmp_path_factory, prefect_server):
    """The shipped methods sweep (every method at its four budgets, three replicates each),
    run to its end once on a tiny base; its folder, MLflow store and study storage."""
    folder = tmp_path_factory.mktemp("methods")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("PREFECT_API_URL", prefect_server)
        patch.chdir(folder)
        storage = f"sqlite:///{folder / 'optuna.db'}"
        fields = tiny_overrides(METHODS, storage, folder / "artifacts", replicates=None)
        items = [f"{key}={json.dumps(value)}" for key, value in fields.items()]
        argv = ["sweep", str(METHODS), "--no-progress", *[a for i in items for a in ("--set", i)]]
        assert pwf_main(argv) == 0
        yield folder, uri, storage


def _report(folder: Path, uri: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pwf_flows.cli", "report", *argv],
        cwd=folder,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def methods_report(methods_sweep) -> Path:
    """``pwf report`` of the methods sweep, run once as a user runs it; its folder."""
    folder, uri, _ = methods_sweep
    done = _report(folder, uri, "--sweep", str(METHODS), "--out", "out", "--reference", REFERENCE)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "  reliability: " in done.stdout  # every name followed by a space
    return folder / "out"


def experiment_runs(uri: str) -> list:
    """The sweep's replicates' runs (not the sweep's, not the trials' aggregates)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("methods")
    return [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
        if run.data.tags.get("kind") == "experiment"
    ]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _by_setting(uri: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for run in experiment_runs(uri):
        found.setdefault(run.data.tags["setting"], []).append(run)
    return found


def test_the_shipped_methods_sweep_runs_every_setting_three_times(methods_sweep):
    """20 settings (5 methods x 4 budgets), each a trial of 3 replicates: 60 runs, each once,
    and Optuna told each trial's replicates' means."""
    _, uri, storage = methods_sweep
    study = optuna.load_study(study_name="methods", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 20 and len({t.params["compression"] for t in complete}) == 20
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING))
    settings = _by_setting(uri)
    assert len(settings) == 20
    assert all(
        sorted(r.data.tags["replicate"] for r in runs) == ["0", "1", "2"]
        for runs in settings.values()
    )
    client = MlflowClient(uri)
    for trial in complete:
        trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert trial_run.data.tags["kind"] == "trial" and trial_run.info.status == "FINISHED"
        runs = settings[trial_run.data.tags["setting"]]
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {trial_run.info.run_id}
        accuracy = [r.data.metrics["final/cls/acc"] for r in runs]
        values = [r.data.metrics["final/ws/unique_values"] for r in runs]
        assert trial.values == pytest.approx([np.mean(accuracy), np.mean(values)])
        assert trial.user_attrs["accuracy_n"] == 3
        # one pretrained model for every replicate and method; the compression reseeded
        assert {r.data.tags["pretrain.path"] for r in runs} == {runs[0].data.tags["pretrain.path"]}
        assert sorted(r.data.params["replicate.index"] for r in runs) == ["0", "1", "2"]


def _independent_settings(uri: str) -> dict[str, dict]:
    """Each setting's top-1 and budget count per replicate, from MLflow, by setting."""
    found = {}
    for key, runs in _by_setting(uri).items():
        metrics = [r.data.metrics for r in runs]
        found[key] = {
            "method": runs[0].data.tags["method"],
            "top1": {
                r.data.params["replicate.index"]: r.data.metrics["final/cls/acc"] for r in runs
            },
            "count": np.mean(
                [m.get("final/ws/shared_values", m["final/ws/unique_values"]) for m in metrics]
            ),
        }
    return found


def _best_within(settings: dict[str, dict], method: str, budget: int) -> str | None:
    within = [k for k, s in settings.items() if s["method"] == method and s["count"] <= budget]
    return max(within, key=lambda k: np.mean(list(settings[k]["top1"].values())), default=None)


def test_the_reports_numbers_equal_scipys_from_the_mlflow_runs(methods_sweep, methods_report):
    """Every setting's mean, sd and interval, and every paired comparison at every budget, as
    scipy computes them from the MLflow runs directly."""
    _, uri, _ = methods_sweep
    settings = _independent_settings(uri)
    rows = {row["setting"]: row for row in _csv(methods_report / "table.csv")}
    assert len(rows) == 20
    for key, setting in settings.items():
        row = rows[key]
        top1 = 100 * np.array(list(setting["top1"].values()))
        assert row["n"] == "3"
        assert float(row["top-1 (%) mean"]) == pytest.approx(top1.mean())
        assert float(row["top-1 (%) sd"]) == pytest.approx(np.std(top1, ddof=1))
        if np.std(top1) > 0:
            low, high = stats.t.interval(0.95, 2, loc=top1.mean(), scale=stats.sem(top1))
            assert float(row["top-1 (%) 95% CI low"]) == pytest.approx(low)
            assert float(row["top-1 (%) 95% CI high"]) == pytest.approx(high)
    comparison = _csv(methods_report / "comparison.csv")
    budgets = sorted({int(r["K (values at most)"]) for r in comparison})
    assert budgets == [8, 16, 32, 64]
    compared = 0
    for budget in budgets:
        anchor = _best_within(settings, REFERENCE, budget)
        for method in ("2dgbnn", "kmeans", "uniform", "wfn"):
            (row,) = [
                r
                for r in comparison
                if r["K (values at most)"] == str(budget) and r["method"] == method
            ]
            best = _best_within(settings, method, budget)
            if best is None:
                assert row["verdict"] == f"no setting within {budget} values"
                continue
            assert rows[best]["knobs"] == row["knobs"]
            if anchor is None:
                assert row["verdict"].startswith("n/a, no reference setting")
                continue
            a = np.array([settings[best]["top1"][i] for i in "012"])
            b = np.array([settings[anchor]["top1"][i] for i in "012"])
            assert row["pairs"] == "3"
            assert float(row["Δ top-1 vs reference (pt)"]) == pytest.approx(100 * np.mean(a - b))
            if len(set(a - b)) > 1:
                test = stats.ttest_rel(a, b)
                interval = test.confidence_interval(0.95)
                assert float(row["p (paired t)"]) == pytest.approx(test.pvalue)
                assert float(row["p (Wilcoxon)"]) == pytest.approx(stats.wilcoxon(a, b).pvalue)
                assert float(row["Δ 95% CI low (pt)"]) == pytest.approx(100 * interval.low)
                assert float(row["Δ 95% CI high (pt)"]) == pytest.approx(100 * interval.high)
                if test.pvalue >= 0.05:
                    assert row["verdict"] == "not significant at n = 3"
                compared += 1
    assert compared > 0  # at least one comparison had a spread to test


def test_the_report_holds_every_method_with_the_numbers_mlflow_holds(methods_sweep, methods_report):
    _, uri, _ = methods_sweep
    out = methods_report
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    runs = {run.info.run_id: run for run in experiment_runs(uri)}
    rows = _csv(out / "runs.csv")
    assert len(rows) == 60
    assert sorted({row["method"] for row in rows}) == ["2dgbnn", "kmeans", "pwfn", "uniform", "wfn"]
    for row in rows:
        metrics = runs[row["run_id"]].data.metrics
        assert float(row["top-1"]) == metrics["final/cls/acc"]
        assert float(row["unique values"]) == metrics["final/ws/unique_values"]
        assert float(row["ECE"]) == metrics["final/cal/ece"]
        assert float(row["file bytes (entropy-coded)"]) == metrics["final/size/file_bytes"]
        delta = metrics["final/cls/acc"] - metrics["pretrain/test_acc"]
        assert float(row["Δ top-1 vs pretrained"]) == pytest.approx(delta)
        if row["method"] == "2dgbnn":  # its Gaussians counted apart from its outliers
            shared, outliers = float(row["shared values"]), float(row["outliers"])
            assert shared + outliers == float(row["unique values"])
            assert metrics["final/ws/shared_values"] == shared
    for row in _csv(out / "table.csv"):
        run = next(r for r in runs.values() if r.data.tags["setting"].startswith(row["setting"]))
        knobs = {
            key.removeprefix("knob."): v for key, v in run.data.params.items() if "knob." in key
        }
        # the size knobs as the run resolved them, never "auto" or "defaults"
        assert knobs and row["knobs"] == ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))
        assert "auto" not in row["knobs"]
        # a fully fixed model is deterministic: no sampled metric, an empty sampled cell
        sampled = run.data.metrics.get("final/sampled/cls/acc")
        assert (sampled is None) == (row["method"] != "2dgbnn")
        assert (row["sampled top-1 (%) mean"] == "") == (sampled is None)
    knobs = {row["knobs"] for row in _csv(out / "table.csv")}
    assert {"clusters=8", "bits=4", "b=5, max_order=2", "b=5, delta=0.1"} <= knobs
    assert {r["method"] for r in _csv(out / "comparison.csv") if r["verdict"] == "reference"} == {
        REFERENCE
    }
    page = (out / "report.html").read_text()
    samples = int(next(iter(runs.values())).data.metrics["final/data/test_samples"])
    line = f"one test sample = {100 / samples:.2f} pt, n = {samples}."
    assert page.count(line) == 3 and line in (out / "table.md").read_text()
    assert 'id="few-replicates"' not in page  # every setting has its 3 replicates
    assert f"against {REFERENCE}" in page
    # Nothing is fetched (it opens offline); links lead only to the runs' MLflow and Prefect pages.
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert not re.findall(r"url\((?!#)", page) and "@import" not in page  # url(#id) is inline
    links = re.findall(r'<a href="([^"]+)"', page)
    assert links and all(re.match(r"http://127\.0\.0\.1:\d+/", link) for link in links)
    assert "shared Gaussians plus the outliers" in page  # the front says which count it uses
    tex = (out / "table.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\pm" in tex


def test_the_sweep_leaves_its_report_in_mlflow_and_prefect(methods_sweep):
    _, uri, storage = methods_sweep
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("methods")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/front.png", "report/table.csv"} <= logged
    assert "[the trials compared](" in parent.data.tags["mlflow.note.content"]
    for run in experiment_runs(uri)[:5]:
        tags = run.data.tags
        assert run.info.run_name.startswith(tags["method"]) and tags["method"]
        images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert any("reliability" in path for path in images), images  # the compare view's
    study = optuna.load_study(study_name="methods", storage=storage)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        url = trial.user_attrs["mlflow_run_url"]  # the trial's run, in the model-training view
        assert url.endswith(f"/runs/{trial.user_attrs['mlflow_run_id']}?{TRAINING_VIEW}")
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    kinds = {artifact.type for artifact in artifacts if "methods" in (artifact.key or "")}
    assert {"table", "markdown"} <= kinds
    front = next(a for a in artifacts if a.type == "markdown" and "front" in (a.key or ""))
    assert "data:image/png;base64," in front.data and "pwfn" in front.data


def test_a_sweep_cut_short_before_its_reference_ran_still_ends_with_its_report(
    tmp_path, prefect_server, monkeypatch
):
    """The methods sweep stopped after one trial (``--set study.n_trials=1``) that is not
    PWFN: the sweep ends, its report compares what ran, and the log says why."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    fields = tiny_overrides(METHODS, storage, tmp_path / "artifacts", n_trials=1)
    study = optuna.create_study(
        study_name="methods", storage=storage, directions=["maximize", "minimize"]
    )
    study.enqueue_trial({"compression": "kmeans 8"})
    items = [f"{key}={json.dumps(value)}" for key, value in fields.items()]
    argv = [sys.executable, "-m", "pwf_flows.cli", "sweep", str(METHODS), "--no-progress"]
    done = subprocess.run(
        [*argv, *[a for i in items for a in ("--set", i)]],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "--reference 'pwfn' has no run in this report" in output
    assert "compared with the first method instead" in output
    (trial,) = optuna.load_study(study_name="methods", storage=storage).trials
    assert trial.params == {"compression": "kmeans 8"} and trial.state == TrialState.COMPLETE
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("methods")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'")
    assert parent.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/table.csv" in logged


def test_the_page_renders_in_a_headless_browser_with_mlflows_numbers(
    methods_sweep, methods_report, tmp_path
):
    from selenium.webdriver.common.by import By

    _, uri, _ = methods_sweep
    with chromium() as driver:
        driver.get((methods_report / "report.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        runs = {run.info.run_id: run.data.metrics for run in experiment_runs(uri)}
        shown = driver.find_elements(By.CSS_SELECTOR, "tr[data-run]")
        assert len(shown) == len(runs) == 60
        for row in shown[:10]:
            metrics = runs[row.get_attribute("data-run")]
            cell = row.find_element(By.CSS_SELECTOR, 'td[data-key="cls/acc"]')
            assert float(cell.get_attribute("data-value")) == metrics["final/cls/acc"]
            assert cell.text == f"{100 * metrics['final/cls/acc']:.2f} %"  # what a reader reads
        assert not driver.find_elements(By.ID, "few-replicates")
        assert_no_wrapped_cells(driver)
        front = driver.find_element(By.CSS_SELECTOR, "#front svg")
        assert front.size["width"] > 400 and front.size["height"] > 200
        points = driver.find_elements(By.CSS_SELECTOR, "#front svg g[id^='setting-'] > title")
        assert len(points) == 20
        assert any(p.get_attribute("textContent").startswith("pwfn b=5") for p in points)
        assert driver.find_element(By.CSS_SELECTOR, "#reliability svg").size["width"] > 300
        driver.save_screenshot(str(tmp_path / "report.png"))
    from PIL import Image

    with Image.open(tmp_path / "report.png") as shot:
        shades = shot.convert("L").getcolors(maxcolors=256)
        assert shot.size[0] >= 1000 and shades is not None and len(shades) > 20  # not blank
    if os.environ.get("PWF_UPDATE_SCREENSHOT"):  # how docs/report.png is made
        shutil.copy(tmp_path / "report.png", SCREENSHOT)


BAD = {
    "unknown-experiment": (["--experiment", "nope"], "no MLflow experiment 'nope'"),
    "unknown-run": (["--run", "0123456789abcdef"], "no MLflow run '0123456789abcdef'"),
    "nothing-named": ([], "name what to report on"),
    "empty-selection": (["--experiment", "empty"], "holds no finished experiment run"),
    "datasets-in-one-panel": (
        ["--experiment", "methods", "--experiment", "elsewhere", "--one-panel"],
        "runs of different datasets (digits, mnist) cannot share one panel",
    ),
    "unreachable": (["--experiment", "methods", "--tracking-uri", "{closed}"], "did not answer"),
    "no-store": (["--experiment", "methods", "--tracking-uri", "{missing}"], "no MLflow store"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_end_in_one_line_and_write_nothing(
    case, methods_sweep, tmp_path, capsys, monkeypatch
):
    folder, uri, _ = methods_sweep
    client = MlflowClient(uri)
    if client.get_experiment_by_name("empty") is None:
        client.create_experiment("empty")
        other = client.create_run(client.create_experiment("elsewhere"), tags={"dataset": "mnist"})
        client.log_metric(other.info.run_id, "final/cls/acc", 0.99)
        client.log_metric(other.info.run_id, "final/ws/unique_values", 50)
        client.set_terminated(other.info.run_id)
    argv, expected = BAD[case]
    closed = f"http://127.0.0.1:{free_port()}"
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    argv = [a.format(closed=closed, missing=missing) for a in argv]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(folder)
    code = run_pwf(monkeypatch, ["report", *argv, "--out", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("pwf: ") and expected in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "none.db").exists()
