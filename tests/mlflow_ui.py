"""A headless Chromium (Debian's chromium and chromium-driver, `make browser`) driven by Selenium
through MLflow's UI, reading what a person sees there."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager

PAGE_TIMEOUT_S = 90  # the UI's first load compiles a large bundle: slow on a loaded 2-core machine

# The compare page's metrics table is two virtualized grids side by side (names, values) that render
# only the rows in view: scroll both, read every rendered cell with its vertical offset, pair by it.
_READ_GRIDS = """
const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
const at = typeof arguments[0] === 'number' ? arguments[0] : grids.findIndex(g => g.textContent.includes(arguments[0]));
if (at < 0 || at + 1 >= grids.length) return null;
const [names, values] = [grids[at], grids[at + 1]];
names.scrollTop = arguments[1];
values.scrollTop = arguments[1];
const cells = g => [...g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')]
  .map(c => [parseFloat(c.style.top), parseFloat(c.style.left || 0), c.textContent.trim()]);
return {at: at, height: names.scrollHeight, names: cells(names), values: cells(values)};
"""


@contextmanager
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1600,1200")
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def page_text_once(driver, url: str, *expected: str) -> str:
    """Open `url` and wait until the page's visible text holds every `expected` string."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    text = ""

    def shows_all(d) -> bool:
        nonlocal text
        text = d.find_element("tag name", "body").text
        return all(e in text for e in expected)

    try:
        WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=1).until(shows_all)
    except Exception:
        raise AssertionError(f"{url} never showed {expected}; it shows:\n{text[:3000]}") from None
    return text


def compared_metrics(driver, server: str, experiment_id: str, run_ids: list[str]) -> dict[str, list[str]]:
    """The compare page's metrics table: metric name -> the value shown per run, in `run_ids` order."""
    url = f"{server}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"
    page_text_once(driver, url, "Metrics", "epoch")
    first = driver.execute_script(_READ_GRIDS, "epoch", 0)
    assert first is not None, "the compare page has no metrics table"
    rows: dict[str, list[str]] = {}
    top = 0
    for _ in range(200):  # bounded: 200 scroll positions of 200 px cover 1,000+ metrics
        driver.execute_script(_READ_GRIDS, first["at"], top)
        time.sleep(0.3)  # the grid re-renders on its scroll event
        got = driver.execute_script(_READ_GRIDS, first["at"], top)
        values_at: dict[float, list[tuple[float, str]]] = {}
        for offset, left, text in got["values"]:
            values_at.setdefault(offset, []).append((left, text))
        for offset, _, name in got["names"]:
            rows[name] = [text for _, text in sorted(values_at.get(offset, []))]
        if top >= got["height"]:
            break
        top += 200
    return rows
