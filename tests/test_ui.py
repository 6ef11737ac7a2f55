"""``pwf ui`` and the links pwf stores, clicked as a researcher clicks them: a real ``pwf run``
and a real sweep recorded locally (the temporary Prefect server, ``mlruns.db``, ``optuna.db``),
the three UIs served by ``pwf ui``, each page opened in the distribution's headless Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pwf_flows.links import LOCAL_UIS, MLFLOW_UI, OPTUNA_UI, PREFECT_UI
from tests._dummies.browser import chromium
from tests._dummies.services import exited, free_port, rest, wait_until
from tests.conftest import ROOT
from tests.test_shipped_sweeps import TINY, TINY_FIXING, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SWEEP = ROOT / "sweeps" / "full-sweep.yaml"
PWF = [sys.executable, "-m", "pwf_flows.cli"]
# What only MLflow's GenAI sidebar holds, and what only its model-training one does.
GENAI_ONLY = {"Observability", "Judges", "Sessions", "Evaluation runs"}
TRAINING_ONLY = {"Model registry"}
PAGE_WAIT_S = 60


@dataclass
class Served:
    """A folder of local runs and the ``pwf ui`` serving it."""

    folder: Path
    env: dict[str, str]
    run_output: str
    sweep_output: str
    ui: subprocess.Popen

    def url(self, ui) -> str:
        return f"http://127.0.0.1:{self.env[ui.env]}"

    def pwf(self, *argv: str) -> subprocess.CompletedProcess:
        return _pwf(self.folder, self.env, *argv)


def _pwf(folder: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PWF, *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )


def _printed(label: str, output: str) -> str:
    """What the command printed after ``label``."""
    return next(line.split(label, 1)[1].strip() for line in output.splitlines() if label in line)


def _sets(fields: dict) -> list[str]:
    return [arg for key, value in fields.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """``pwf run`` and a two-trial sweep, as a user types them in an empty folder (no servers:
    the temporary Prefect server, SQLite stores), and ``pwf ui`` started meanwhile, at ports
    of this test's own."""
    folder = tmp_path_factory.mktemp("ui")
    unset = {"PREFECT_API_URL", "PREFECT_UI_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env |= {ui.env: str(free_port()) for ui in LOCAL_UIS}
    tiny = TINY | {f"compression.{key}": value for key, value in TINY_FIXING.items()}
    run = _pwf(folder, env, "run", "--no-progress", *_sets(tiny))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ui = _start_ui(folder, env, folder / "pwf-ui.out")
    try:
        storage = f"sqlite:///{folder / 'optuna.db'}"
        fields = tiny_overrides(SWEEP, storage, folder / "artifacts", n_trials=2)
        sweep = _pwf(folder, env, "sweep", str(SWEEP), "--no-progress", *_sets(fields))
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        _wait_serving(ui, folder / "pwf-ui.out")
        yield Served(folder, env, run.stdout, sweep.stdout, ui)
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def _start_ui(folder: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(
            [*PWF, "ui"],
            cwd=folder,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_serving(ui: subprocess.Popen, log: Path) -> None:
    wait_until(lambda: "logs:" in log.read_text(), "pwf ui to serve", 180, processes=[ui])


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium(height=1000) as driver:
        yield driver


def _shows(driver, text: str) -> None:
    """Wait until the page (any tab's newest) shows ``text``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d) -> bool:
        return text in d.find_element(By.TAG_NAME, "body").text

    try:
        WebDriverWait(driver, PAGE_WAIT_S, poll_frequency=0.3).until(found)
    except Exception as err:
        body = driver.find_element(By.TAG_NAME, "body").text[:1500]
        raise AssertionError(f"{driver.current_url} never showed {text!r}:\n{body}") from err


def _follow(driver, label: str, expected: str) -> str:
    """Click the link named ``label`` on the page, go where it opens (a new tab or this one)
    and wait until that page shows ``expected``; its address."""
    from selenium.webdriver.common.by import By

    _shows(driver, label)
    before = set(driver.window_handles)
    link = driver.find_element(By.XPATH, f"//a[normalize-space()={json.dumps(label)}]")
    href = link.get_attribute("href")
    link.click()
    opened = set(driver.window_handles) - before
    if opened:
        driver.close()
        driver.switch_to.window(opened.pop())
    _shows(driver, expected)
    return href


def _sidebar(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    return set(driver.find_element(By.TAG_NAME, "aside").text.splitlines())


def _in_training_view(driver) -> None:
    sidebar = _sidebar(driver)
    assert sidebar >= TRAINING_ONLY and not GENAI_ONLY & sidebar, sidebar
    assert "workflowType=genai" not in driver.current_url
    assert not re.search(r"/(traces|overview)\b", driver.current_url), driver.current_url


def _runs(served: Served, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{served.folder / 'mlruns.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id])


def test_every_stored_link_names_where_pwf_ui_serves_it(served):
    mlflow, prefect = served.url(MLFLOW_UI), served.url(PREFECT_UI)
    assert _printed("run page:", served.run_output).startswith(f"{mlflow}/#/experiments/")
    assert _printed("Prefect:", served.run_output).startswith(f"{prefect}/")
    assert "pwf ui" in _printed("browse:", served.run_output)
    for run in _runs(served, "pwf-default") + _runs(served, "full-sweep"):
        tags = run.data.tags
        links = re.findall(r"\]\((http[^)]+)\)", tags["mlflow.note.content"])
        if "prefect.flow_run_url" in tags:
            links.append(tags["prefect.flow_run_url"])
        assert links, tags["mlflow.note.content"]
        for link in links:  # no temporary server's port, every MLflow page in the right view
            assert link.startswith((mlflow, prefect, served.url(OPTUNA_UI))), link
            if link.startswith(mlflow):
                assert link.endswith("workflowType=machine_learning") or (
                    "workflowType=machine_learning&" in link
                ), link
        assert "data.img_size" not in run.data.params  # digits have one size


def test_the_runs_model_files_record_how_to_feed_them(served):
    from pwf_core.data import recorded_contract
    from pwf_core.export import read_header
    from pwf_core.onnx_export import recorded_input

    final = Path(_printed("artifacts:", served.run_output)) / "final"
    contract = recorded_contract(read_header(final / "model.pwf.safetensors"))
    assert contract.shape == (1, 8, 8) and contract.divide_by == 16.0
    onnx_input = recorded_input(final / "model.onnx")
    assert onnx_input["mean"] == list(contract.mean) and not onnx_input["normalisation_in_graph"]


def test_the_mlflow_run_page_opens_in_the_model_training_view(served, browser):
    (run,) = _runs(served, "pwf-default")
    browser.get(_printed("run page:", served.run_output))
    _shows(browser, run.info.run_name)
    _in_training_view(browser)


def test_the_descriptions_prefect_link_opens_that_flow_run(served, browser):
    (run,) = _runs(served, "pwf-default")
    browser.get(_printed("run page:", served.run_output))
    _shows(browser, run.info.run_name)
    href = _follow(browser, "Prefect flow run", run.data.tags["prefect.flow_run_name"])
    assert run.data.tags["prefect.flow_run_id"] in href and browser.current_url.startswith(
        served.url(PREFECT_UI)
    )
    _shows(browser, "pwf-experiment")  # the flow's name, on the flow run's page
    api = f"{served.url(PREFECT_UI)}/api"
    tasks = rest(
        f"{api}/task_runs/filter",
        {"flow_runs": {"id": {"any_": [run.data.tags["prefect.flow_run_id"]]}}},
    )
    assert sorted(t["name"] for t in tasks) == sorted(
        ["pretrain", "prepare", "round 1 of 2", "round 2 of 2", "evaluate"]
    )


def test_the_optuna_trial_note_opens_the_trials_mlflow_run(served, browser):
    trials = {
        r.data.tags["sweep.trial"]: r
        for r in _runs(served, "full-sweep")
        if r.data.tags.get("sweep.trial")
    }
    assert sorted(trials) == ["0", "1"]
    browser.get(f"{served.url(OPTUNA_UI)}/dashboard/studies/1/trials?numbers=1")
    _follow(browser, "MLflow run", trials["1"].info.run_name)
    assert trials["1"].info.run_id in browser.current_url
    _in_training_view(browser)


def test_the_study_note_leads_to_the_sweep_its_trials_and_their_comparison(served, browser):
    (parent,) = [r for r in _runs(served, "full-sweep") if r.data.tags.get("kind") == "sweep"]
    study = f"{served.url(OPTUNA_UI)}/dashboard/studies/1/note"  # the study note's page
    browser.get(study)
    _follow(browser, "MLflow parent run", parent.info.run_name)
    _in_training_view(browser)
    browser.get(study)
    _follow(browser, "every trial in MLflow", parent.info.run_name)  # the experiment's runs
    _in_training_view(browser)
    assert "/runs" in browser.current_url
    browser.get(study)
    _follow(browser, "MLflow's comparison", "Comparing 2 Runs")
    _in_training_view(browser)


def test_the_reports_links_resolve_under_pwf_ui(served, browser):
    from selenium.webdriver.common.by import By

    done = served.pwf("report", "--sweep", "full-sweep", "--out", "report")
    assert done.returncode == 0, done.stderr[-2000:]
    labels = re.findall(r"^  (\S+:)(\s*)", done.stdout, flags=re.M)
    assert labels and all(space for _, space in labels), done.stdout  # "reliability: reports/"
    browser.get((served.folder / "report" / "report.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-run]")
    links = [a.get_attribute("href") for row in rows for a in row.find_elements(By.TAG_NAME, "a")]
    trials = {r.info.run_id: r for r in _runs(served, "full-sweep")}
    assert len(rows) == 2 and len(links) == 4, links
    for href in links:
        browser.get(href)
        if href.startswith(served.url(MLFLOW_UI)):
            run_id = re.search(r"/runs/([0-9a-f]{32})", href).group(1)
            _shows(browser, trials[run_id].info.run_name)
            _in_training_view(browser)
        else:
            assert href.startswith(served.url(PREFECT_UI)), href
            _shows(browser, "sweep-full-sweep")  # the sweep's flow run, the trials' tasks in it


def test_pwf_ui_stops_every_ui_on_sigterm(served):
    """A ``pwf ui`` of its own (on the same stores, other ports), so that the order in which
    tests run does not matter."""
    env = served.env | {ui.env: str(free_port()) for ui in LOCAL_UIS}
    log = served.folder / "pwf-ui-stopped.out"
    command = _start_ui(served.folder, env, log)
    try:
        _wait_serving(command, log)
        started = psutil.Process(command.pid).children(recursive=True)
        assert len(started) >= 3  # MLflow, Prefect and optuna-dashboard, and their workers
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=30) == 0
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    wait_until(lambda: all(exited(p) for p in started), "every UI process to exit", 15)
    for ui in LOCAL_UIS:  # nothing listens where they served
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(env[ui.env]))) != 0
    assert log.read_text().rstrip().endswith("pwf ui: stopped")


def test_a_port_in_use_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from pwf_flows.cli import main as pwf_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MLFLOW_UI.env, raising=False)  # the command exports the port it got
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert pwf_main(["ui", "--mlflow-port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pwf: port {port} (MLflow) is in use"), lines
    assert "--mlflow-port" in lines[0] and MLFLOW_UI.env in lines[0]
    assert not list(tmp_path.iterdir())  # refused before anything started or was created
