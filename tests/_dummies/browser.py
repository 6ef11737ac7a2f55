"""The distribution's headless Chromium, driven by selenium, for the tests that open a page as a
reader does (``make test`` installs ``chromium`` and ``chromium-driver``)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1800) -> Iterator:
    """The distribution's headless Chromium driven by selenium; its console errors kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()
