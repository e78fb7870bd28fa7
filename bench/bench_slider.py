"""How fast does the Prune page answer a slider move? Measured in a real browser, against Streamlit's floor.

In one run, on this machine, headless Debian Chromium drives three pages, each served by its own
``streamlit run`` (headless, file watcher off):

* **floor** - ``bench/floor_app.py``: one slider and one three-bar plotly chart, nothing else;
  the fastest a Streamlit slider can redraw a chart here;
* **prune, mlp** - the app's Prune page with the default mlp on digits (opened through its link,
  ``/prune?model=mlp&data=digits``);
* **prune, 25 M** - the same page with a 25 M-parameter MLP (``bench.common:mlp_25m``) built through
  the Model page's factory form;
* the floor and the mlp page once more with ``--runner.postScriptGC true``, Streamlit's default that
  ``.streamlit/config.toml`` turns off: a full ``gc.collect(2)`` after every script run, which held
  the GIL for 110-200 ms while a slider move's reply waited to be sent.

A move is one ArrowRight / ArrowLeft on the focused sparsity slider. Its latency runs from the
browser's keydown event to the moment the first chart's bar heights differ (polled in the page
every 2 ms), both on the page's own clock, so Selenium's overhead is not counted. The median of
``--moves`` moves per page is reported, and each page's median divided by the floor's.

Run from the repository root: ``python -m bench.bench_slider [--moves 15]``; it writes
``bench/RESULTS_slider.md``. Needs ``selenium`` and Debian's ``chromium`` + ``chromium-driver``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import streamlit
import torch
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bench.common import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS_slider.md"

_WAIT_FOR_REDRAW = """
const before = arguments[0], done = arguments[arguments.length - 1];
const started = performance.now();
function heights() {
  const plot = document.querySelector('.js-plotly-plot');
  return plot && plot._fullData && plot._fullData.length ? JSON.stringify(Array.from(plot._fullData[0].y)) : null;
}
function check() {
  const now = heights();
  if (now !== null && now !== before && window.__keydown) { done(performance.now() - window.__keydown); return; }
  if (performance.now() - started > 30000) { done(-1); return; }
  setTimeout(check, 2);
}
check();
"""
_HEIGHTS = """
const plot = document.querySelector('.js-plotly-plot');
return plot && plot._fullData && plot._fullData.length ? JSON.stringify(Array.from(plot._fullData[0].y)) : null;
"""
_LISTEN = ("window.__keydown = null; document.addEventListener('keydown', () => { window.__keydown = "
           "performance.now(); }, {capture: true});")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(script: str, folder: Path, *options: str):
    """``streamlit run script`` headless on a free port; yields its URL; always stopped."""
    port = free_port()
    env = {**os.environ, "PRUNING_EXPLORER_DATA": str(folder / "data"), "PRUNING_EXPLORER_CACHE": str(folder / "cache")}
    log = open(folder / f"{Path(script).stem}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script, "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
         *options],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start: see {log.name}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def browser(folder: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--no-first-run", f"--user-data-dir={folder / 'profile'}",
                     "--window-size=1500,1300"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(driver, condition, timeout: float, message: str):
    def safe(d):
        try:
            return condition(d)
        except (StaleElementReferenceException, WebDriverException):
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(safe, message)


def settle(driver) -> None:
    time.sleep(0.3)
    wait_for(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'), 300,
             "the app kept running")
    time.sleep(0.3)


def thumb(driver):
    """The sparsity slider's focusable input: the Prune page's live slider, or Streamlit's (the floor)."""
    live = driver.find_elements(By.CSS_SELECTOR, 'input[type="range"][aria-label^="Sparsity (fraction"]')
    if live:
        return live[0]
    for slider in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSlider"]'):
        if "Sparsity (fraction" in slider.text:
            return slider.find_element(By.CSS_SELECTOR, 'input[type="range"]')
    return None


def measure_moves(driver, moves: int) -> list[float]:
    """Milliseconds from keydown to a changed chart, for ``moves`` alternating right/left steps."""
    wait_for(driver, lambda d: thumb(d) is not None and d.execute_script(_HEIGHTS) is not None, 300, "no slider/chart")
    settle(driver)
    driver.execute_script(_LISTEN)
    times = []
    for move in range(moves + 2):  # two warm-up moves
        handle = thumb(driver)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", handle)
        before = driver.execute_script(_HEIGHTS)
        driver.execute_script("window.__keydown = null;")
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT if move % 2 == 0 else Keys.ARROW_LEFT).perform()
        elapsed = driver.execute_async_script(_WAIT_FOR_REDRAW, before)
        if elapsed < 0:
            raise RuntimeError("the chart did not change within 30 s of a slider move")
        if move >= 2:
            times.append(elapsed)
        settle(driver)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=15)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        driver = browser(folder)
        try:
            with served("bench/floor_app.py", folder) as url:
                driver.get(url)
                rows["floor (one slider, one chart)"] = measure_moves(driver, args.moves)
            with served("app.py", folder) as url:
                driver.get(f"{url}/prune?model=mlp&data=digits")
                rows["Prune page, mlp (51 k weights)"] = measure_moves(driver, args.moves)
                load_factory(driver, url, "bench.common:mlp_25m")
                rows["Prune page, 25.5 M-parameter MLP"] = measure_moves(driver, args.moves)
            with served("bench/floor_app.py", folder, "--runner.postScriptGC", "true") as url:
                driver.get(url)
                rows["floor, Streamlit's default post-run GC"] = measure_moves(driver, args.moves)
            with served("app.py", folder, "--runner.postScriptGC", "true") as url:
                driver.get(f"{url}/prune?model=mlp&data=digits")
                rows["Prune page, mlp, Streamlit's default post-run GC"] = measure_moves(driver, args.moves)
        finally:
            driver.quit()
    floor = statistics.median(rows["floor (one slider, one chart)"])
    lines = [
        "# Slider latency in a real browser (keydown to redrawn chart)",
        "",
        f"{datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"streamlit {streamlit.__version__}, load average before the run {os.getloadavg()[0]:.2f}; "
        f"headless Debian Chromium; {args.moves} moves per page (after 2 warm-up moves), median.",
        "",
        "| page | median ms | p90 ms | x floor |",
        "|---|---|---|---|",
    ]
    for name, times in rows.items():
        ordered = sorted(times)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        lines.append(f"| {name} | {median:.0f} | {p90:.0f} | {median / floor:.2f} |")
    lines += ["", "Command: `python -m bench.bench_slider --moves " + str(args.moves) + "`", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


def load_factory(driver, url: str, spec: str) -> None:
    """Build ``spec`` through the Model page's factory form (no training), then open Prune in the same session."""
    driver.get(url)
    wait_for(driver, lambda d: "Baseline accuracy" in d.find_element(By.TAG_NAME, "body").text, 300, "no model")
    settle(driver)
    driver.find_element(By.XPATH, "//label[.//p[text()='Python factory']]").click()
    settle(driver)
    field = wait_for(driver, lambda d: d.find_element(By.XPATH, "//input[@aria-label='Factory (package.module:callable)']"),
                     30, "no factory field")
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(spec, Keys.ENTER)
    settle(driver)
    epochs = driver.find_element(By.XPATH, "//input[@aria-label='Train epochs (a factory gives untrained weights)']")
    epochs.click()
    epochs.send_keys(Keys.CONTROL, "a")
    epochs.send_keys("0", Keys.ENTER)
    settle(driver)
    next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Build").click()
    wait_for(driver, lambda d: spec in d.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"]').text, 600,
             "the factory model did not load")
    settle(driver)
    link = next(a for a in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNavLink"]')
                if a.text.strip().splitlines()[-1:] == ["Prune"])
    link.click()
    wait_for(driver, lambda d: any(h.text.strip() == "Prune" for h in d.find_elements(By.TAG_NAME, "h1")), 120,
             "the Prune page did not open")
    settle(driver)


if __name__ == "__main__":
    main()
