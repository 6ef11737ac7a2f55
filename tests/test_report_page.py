"""The report page as a reader sees it, in a real headless Chromium: the intervals, the paired
comparison against the reference, the test split's resolution under every accuracy table, the
warning for settings of fewer than three replicates, no number wrapped in a cell, and the
front's points naming their settings; from a real MLflow store of replicated runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from pwf_flows.report import Selection, build_report, write_report
from tests._dummies.browser import chromium
from tests.test_report_statistics import N_TEST, SETTINGS, SWEEP, expected_settings, make_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Cells whose text runs over more than one line (distinct line tops of the text's boxes).
WRAPPED = """
return Array.from(document.querySelectorAll('td, th')).filter(cell => {
  const range = document.createRange();
  range.selectNodeContents(cell);
  const tops = new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top)));
  return tops.size > 1 || getComputedStyle(cell).whiteSpace !== 'nowrap';
}).map(cell => cell.textContent);
"""


def assert_no_wrapped_cells(driver) -> None:
    wrapped = driver.execute_script(WRAPPED)
    assert not wrapped, f"cells on more than one line or allowed to wrap: {wrapped[:5]}"


def test_the_page_shows_intervals_paired_tests_resolution_and_the_warning(tmp_path):
    from selenium.webdriver.common.by import By

    uri = make_store(tmp_path)
    report = build_report(
        MlflowClient(uri), Selection(sweep=SWEEP), "bench", "test", reference="kmeans"
    )
    page = write_report(report, tmp_path / "out")["html"]
    grouped = expected_settings(uri)
    with chromium(width=1000) as driver:  # narrower than the tables: they scroll, never wrap
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # every setting's top-1: mean ± half-width of the Student-t interval, sd, [low, high]
        rows = driver.find_elements(By.CSS_SELECTOR, "table.settings tr[data-setting]")
        assert len(rows) == len(SETTINGS)
        for row in rows:
            runs = grouped[row.get_attribute("data-setting").removesuffix("-key")]
            top1 = 100 * np.array([r.data.metrics["final/cls/acc"] for r in runs])
            cell = row.find_element(By.CSS_SELECTOR, 'td[data-key="cls/acc"]')
            assert int(cell.get_attribute("data-n")) == len(top1)
            if len(top1) == 1:
                assert cell.text == f"{top1[0]:.2f}"
                continue
            half = stats.t.ppf(0.975, len(top1) - 1) * np.std(top1, ddof=1) / math.sqrt(len(top1))
            assert cell.text == f"{np.mean(top1):.2f} ± {half:.2f}"
            low, high = np.mean(top1) - half, np.mean(top1) + half
            assert row.find_element(By.CSS_SELECTOR, "td.ci").text == f"[{low:.2f}, {high:.2f}]"
            assert row.find_element(By.CSS_SELECTOR, "td.sd").text == f"{np.std(top1, ddof=1):.2f}"
        # the paired comparison at each budget, against the reference the page names
        named = driver.find_element(By.ID, "reference").text
        assert "compared against kmeans (named with --reference)" in named
        row = driver.find_element(
            By.CSS_SELECTOR, 'table.budgets tr[data-budget="16"][data-method="2dgbnn"]'
        )
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        a = np.array([r.data.metrics["final/cls/acc"] for r in grouped["2dgbnn-12"]])
        b = np.array([r.data.metrics["final/cls/acc"] for r in grouped["kmeans-16"]])
        test = stats.ttest_rel(a, b)
        interval = test.confidence_interval(0.95)
        assert (
            f"{100 * np.mean(a - b):+.2f} [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"
            in cells
        )
        assert f"{test.pvalue:.3f}" in cells and f"{stats.wilcoxon(a, b).pvalue:.3f}" in cells
        assert cells[-1] == "not significant at n = 3"
        wfn = driver.find_element(By.CSS_SELECTOR, 'tr[data-budget="64"][data-method="wfn"]')
        assert wfn.find_elements(By.TAG_NAME, "td")[-1].text == "n/a, no shared seeds"
        reference = driver.find_elements(By.CSS_SELECTOR, "table.budgets tr.reference")
        assert {r.get_attribute("data-method") for r in reference} == {"kmeans"}
        # the resolution under each of the panel's three accuracy tables
        lines = driver.find_elements(By.CSS_SELECTOR, "p.resolution")
        assert len(lines) == 3
        assert all(
            line.text.endswith(f"one test sample = 0.28 pt, n = {N_TEST}.") for line in lines
        )
        for table in driver.find_elements(By.CSS_SELECTOR, "table"):
            after = table.find_element(By.XPATH, "following::p[1]")
            assert after.tag_name == "p" and "resolution" in after.get_attribute("class")
        # the warning: visible, naming the settings with fewer than three replicates
        warning = driver.find_element(By.ID, "few-replicates")
        assert warning.is_displayed() and warning.size["height"] > 20
        assert (
            "uniform bits=3 (n = 2)" in warning.text
            and "wfn b=5, delta=0.015 (n = 1)" in warning.text
        )
        assert_no_wrapped_cells(driver)
        # the front: one point per setting, each naming its method, knobs and numbers
        titles = [
            t.get_attribute("textContent")
            for t in driver.find_elements(By.CSS_SELECTOR, "#front svg g[id^='setting-'] > title")
        ]
        assert len(titles) == len(SETTINGS)
        assert any(
            t.startswith("pwfn b=5, max_order=4\nn = 3 replicates\ntop-1 (%) ") for t in titles
        )
        assert driver.find_element(By.CSS_SELECTOR, "#reliability svg").size["width"] > 300
