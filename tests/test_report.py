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
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from scipy import stats

from pwf_core.config import config_to_dict, load_config
from pwf_flows.cli import main as pwf_main
from pwf_flows.experiment import pwf_experiment
from pwf_flows.report import Selection, build_report
from tests._dummies.services import free_port
from tests.conftest import ROOT
from tests.test_report_page import assert_no_wrapped_cells, chromium
from tests.test_report_statistics import run_pwf
from tests.test_shipped_sweeps import tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
METHODS = ROOT / "sweeps" / "methods.yaml"
SCREENSHOT = ROOT / "docs" / "report.png"


@pytest.fixture(scope="module")
def methods_sweep(tmp_path_factory, prefect_server):
    """The methods sweep, run to its end once; its folder and MLflow store."""
    folder = tmp_path_factory.mktemp("methods")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("PREFECT_API_URL", prefect_server)
        patch.chdir(folder)
        storage = f"sqlite:///{folder / 'optuna.db'}"
        fields = tiny_overrides(METHODS, storage, folder / "artifacts")
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
    done = _report(folder, uri, "--sweep", str(METHODS), "--out", "out", "--reference", "kmeans")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "  reliability: " in done.stdout  # every name followed by a space
    return folder / "out"


def trial_runs(uri: str) -> list:
    """The sweep's experiment runs (the replicates run after it stand apart, outside it)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("methods")
    return [
        run
        for run in client.search_runs([experiment.experiment_id])
        if run.data.tags.get("kind") not in ("sweep", "trial")
        and "mlflow.parentRunId" in run.data.tags
    ]


REPLICATED = ("kmeans", "pwfn")


@pytest.fixture(scope="module")
def replicated(methods_sweep) -> dict[str, list]:
    """Replicates 1 and 2 of the sweep's k-means and PWFN trials, run by the experiment flow
    from each trial's own config (same pretrained model, compression reseeded); every run of
    those two settings, by method."""
    folder, uri, _ = methods_sweep
    trials = {run.data.tags["method"]: run for run in trial_runs(uri)}
    for method in REPLICATED:
        path = Path(trials[method].data.tags["artifacts"]) / "config.yaml"
        for index in (1, 2):
            pwf_experiment(
                config=config_to_dict(load_config(path, {"replicate.index": index})),
                artifacts_dir=str(folder / "artifacts"),
                progress=False,
            )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("methods").experiment_id
    return {
        method: client.search_runs(
            [experiment], f"tags.setting = '{trials[method].data.tags['setting']}'"
        )
        for method in REPLICATED
    }


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_the_report_holds_every_method_with_the_numbers_mlflow_holds(methods_sweep, methods_report):
    _, uri, _ = methods_sweep
    out = methods_report
    assert {p.name for p in out.iterdir()} == {
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
    runs = {run.info.run_id: run for run in trial_runs(uri)}
    rows = _csv(out / "runs.csv")
    assert sorted(row["method"] for row in rows) == ["2dgbnn", "kmeans", "pwfn", "uniform", "wfn"]
    for row in rows:
        metrics = runs[row["run_id"]].data.metrics
        assert float(row["top-1"]) == metrics["final/cls/acc"]
        assert float(row["unique values"]) == metrics["final/ws/unique_values"]
        assert float(row["ECE"]) == metrics["final/cal/ece"]
        assert float(row["file bytes (entropy-coded)"]) == metrics["final/size/file_bytes"]
        assert float(row["fixed-length bytes"]) == metrics["final/size/fixed_length_bytes"]
        delta = metrics["final/cls/acc"] - metrics["pretrain/test_acc"]
        assert float(row["Δ top-1 vs pretrained"]) == pytest.approx(delta)
    gbnn = next(row for row in rows if row["method"] == "2dgbnn")
    metrics = runs[gbnn["run_id"]].data.metrics
    assert float(gbnn["shared values"]) + float(gbnn["outliers"]) == float(gbnn["unique values"])
    assert metrics["final/ws/shared_values"] == float(gbnn["shared values"])
    # one setting per method, each of one replicate: means are the runs' values, no interval
    settings = {row["method"]: row for row in _csv(out / "table.csv")}
    by_method = {run.data.tags["method"]: run for run in runs.values()}
    for method, row in settings.items():
        run = by_method[method]
        assert row["n"] == "1" and row["top-1 (%) 95% CI low"] == "" and row["top-1 (%) sd"] == ""
        assert float(row["top-1 (%) mean"]) == run.data.metrics["final/cls/acc"]
        assert row["setting"] == run.data.tags["setting"]
        # the size knobs as the run resolved them, never "auto" or "defaults"
        knobs = {
            key.removeprefix("knob."): v for key, v in run.data.params.items() if "knob." in key
        }
        assert knobs and row["knobs"] == ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))
        assert "auto" not in row["knobs"]
        # a fully fixed model is deterministic: no sampled metric, an empty sampled cell
        sampled = run.data.metrics.get("final/sampled/cls/acc")
        assert (sampled is None) == (method != "2dgbnn")
        assert row["sampled top-1 (%) mean"] == ("" if sampled is None else repr(sampled))
    assert settings["kmeans"]["knobs"] == "clusters=32" and settings["uniform"]["knobs"] == "bits=4"
    assert settings["pwfn"]["knobs"].startswith("b=5")
    # against k-means at its 32 values: one shared seed each, so no test
    comparison = _csv(out / "comparison.csv")
    tested = [r for r in comparison if r["pairs"] == "1"]
    assert tested and all(r["verdict"] == "n/a, one shared seed: no test" for r in tested)
    assert {r["method"] for r in comparison if r["verdict"] == "reference"} == {"kmeans"}
    for row in tested:
        mine = by_method[row["method"]].data.metrics["final/cls/acc"]
        theirs = by_method["kmeans"].data.metrics["final/cls/acc"]
        assert float(row["Δ top-1 vs reference (pt)"]) == pytest.approx(mine - theirs)
    page = (out / "report.html").read_text()
    samples = int(next(iter(runs.values())).data.metrics["final/data/test_samples"])
    line = f"one test sample = {100 / samples:.2f} pt, n = {samples}."
    assert page.count(line) == 3 and line in (out / "table.md").read_text()
    assert 'id="few-replicates"' in page and "5 of 5 settings have fewer than 3" in page
    # Nothing is fetched (it opens offline); links lead only to the runs' MLflow and Prefect pages.
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert not re.findall(r"url\((?!#)", page) and "@import" not in page  # url(#id) is inline
    links = re.findall(r'<a href="([^"]+)"', page)
    assert links and all(re.match(r"http://127\.0\.0\.1:\d+/", link) for link in links)
    assert page.count("<title>") >= 1 + len(rows)  # the page's and one per point
    assert "shared Gaussians plus the outliers" in page  # the front says which count it uses
    assert "\\toprule" in (out / "table.tex").read_text()


def test_the_sweep_leaves_its_report_in_mlflow_and_prefect(methods_sweep):
    _, uri, storage = methods_sweep
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("methods")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/front.png", "report/table.csv"} <= logged
    assert "[the trials compared](" in parent.data.tags["mlflow.note.content"]
    for run in trial_runs(uri):
        tags = run.data.tags
        assert run.info.run_name.startswith(tags["method"]) and tags["method"]
        assert (
            "[the sweep's run](http://127.0.0.1:5000/#/experiments/" in tags["mlflow.note.content"]
        )
        images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert any("reliability" in path for path in images), images  # the compare view's
    study = optuna.load_study(study_name="methods", storage=storage)
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        url = trial.user_attrs["mlflow_run_url"]
        assert url.endswith(f"/runs/{trial.user_attrs['mlflow_run_id']}")
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    kinds = {artifact.type for artifact in artifacts if "methods" in (artifact.key or "")}
    assert {"table", "markdown"} <= kinds
    front = next(a for a in artifacts if a.type == "markdown" and "front" in (a.key or ""))
    assert "data:image/png;base64," in front.data and "| pwfn |" in front.data


def test_the_page_renders_in_a_headless_browser_with_mlflows_numbers(
    methods_sweep, methods_report, tmp_path
):
    from selenium.webdriver.common.by import By

    _, uri, _ = methods_sweep
    with chromium() as driver:
        driver.get((methods_report / "report.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        runs = {run.info.run_id: run.data.metrics for run in trial_runs(uri)}
        shown = driver.find_elements(By.CSS_SELECTOR, "tr[data-run]")
        assert len(shown) == len(runs) == 5
        for row in shown:
            metrics = runs[row.get_attribute("data-run")]
            cell = row.find_element(By.CSS_SELECTOR, 'td[data-key="cls/acc"]')
            assert float(cell.get_attribute("data-value")) == metrics["final/cls/acc"]
            assert cell.text == f"{100 * metrics['final/cls/acc']:.2f} %"  # what a reader reads
            ece = row.find_element(By.CSS_SELECTOR, 'td[data-key="cal/ece"]')
            assert ece.text == f"{metrics['final/cal/ece']:.4f}"
        assert driver.find_element(By.ID, "few-replicates").is_displayed()
        assert_no_wrapped_cells(driver)
        front = driver.find_element(By.CSS_SELECTOR, "#front svg")
        assert front.size["width"] > 400 and front.size["height"] > 200
        points = driver.find_elements(By.CSS_SELECTOR, "#front svg g[id^='setting-'] > title")
        assert len(points) == 5
        assert any(p.get_attribute("textContent").startswith("pwfn b=5") for p in points)
        assert driver.find_element(By.CSS_SELECTOR, "#reliability svg").size["width"] > 300
        driver.save_screenshot(str(tmp_path / "report.png"))
    from PIL import Image

    with Image.open(tmp_path / "report.png") as shot:
        shades = shot.convert("L").getcolors(maxcolors=256)
        assert shot.size[0] >= 1000 and shades is not None and len(shades) > 20  # not blank
    if os.environ.get("PWF_UPDATE_SCREENSHOT"):  # how docs/report.png is made
        shutil.copy(tmp_path / "report.png", SCREENSHOT)


def test_real_replicates_are_summarised_and_paired_as_scipy_computes_them(
    methods_sweep, replicated
):
    _, uri, _ = methods_sweep
    report = build_report(
        MlflowClient(uri), Selection(experiments=("methods",)), "t", "test", reference="kmeans"
    )
    settings = {s.method: s for group in report.settings.values() for s in group}
    for method, runs in replicated.items():
        assert len(runs) == 3 and settings[method].n == 3
        indices = sorted(run.data.params["replicate.index"] for run in runs)
        assert indices == ["0", "1", "2"]  # one pretrained model: the compression reseeded
        top1 = np.array([run.data.metrics["final/cls/acc"] for run in runs])
        sd = np.std(top1, ddof=1)
        half = stats.t.ppf(0.975, 2) * sd / np.sqrt(3)
        summary = settings[method].stats["cls/acc"]
        assert (summary.mean, summary.sd) == pytest.approx((top1.mean(), sd))
        assert (summary.low, summary.high) == pytest.approx(
            (top1.mean() - half, top1.mean() + half)
        )

    def by_replicate(runs):
        return {r.data.params["replicate.index"]: r.data.metrics["final/cls/acc"] for r in runs}

    pwfn, kmeans = by_replicate(replicated["pwfn"]), by_replicate(replicated["kmeans"])
    a, b = np.array([pwfn[i] for i in "012"]), np.array([kmeans[i] for i in "012"])
    (rows,) = report.budgets.values()
    comparison = next(  # at the smallest budget both are within
        row.comparison
        for row in rows
        if row.setting is settings["pwfn"] and row.reference is settings["kmeans"]
    )
    assert comparison.n == 3 and comparison.mean == pytest.approx(np.mean(a - b))
    assert len(set(a)) > 1  # the replicates differ: their compression was reseeded
    test = stats.ttest_rel(a, b)
    assert comparison.p_t == pytest.approx(test.pvalue, nan_ok=True)
    assert comparison.p_wilcoxon == pytest.approx(stats.wilcoxon(a, b).pvalue)
    interval = test.confidence_interval(0.95)
    assert (comparison.low, comparison.high) == pytest.approx((interval.low, interval.high))


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
