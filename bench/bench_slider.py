"""How fast does the Prune page answer a slider move? Measured in a real browser, against Streamlit's floor.

In one run, on this machine, headless Debian Chromium drives these pages, each served by its own
``streamlit run`` (headless, file watcher off):

* **floor** - ``bench/floor_app.py``: one ``st.slider`` and one three-bar ``st.plotly_chart``, nothing
  else; the fastest a Streamlit slider can redraw a chart here;
* **floor in a multipage shell** - ``bench/floor_nav_app.py``: the same slider and chart in a fragment
  on one of 8 pages of ``st.navigation`` with a sidebar card, as app.py has them;
* **prune, mlp** - the app's Prune page with the default mlp on digits (opened through its link,
  ``/prune?model=mlp&data=digits``);
* **prune, 25 M** - the same page with a 25 M-parameter MLP (``bench.common:mlp_25m``) built through
  the Model page's factory form;
* the floor and the mlp page once more with ``--runner.postScriptGC true``, Streamlit's default that
  ``.streamlit/config.toml`` turns off: a full ``gc.collect(2)`` after every script run.

A move is one ArrowRight / ArrowLeft on the focused sparsity slider. Its latency runs from the
browser's keydown event to the moment the first chart's bar heights differ (polled in the page
every 2 ms), both on the page's own clock, so Selenium's overhead is not counted. The Prune page's
live slider (app_pages/live_slider.py) redraws without a round trip and reports the value when the
moves settle; for it the table also gives when the server had the value (the link in the address
bar shows the new sparsity; a factory model is not in the link, so not for the 25 M row). The median of ``--moves`` moves per page is reported, and each
page's median divided by the floor's.

Run from the repository root: ``python -m bench.bench_slider [--moves 15]``; it rewrites the part of
``bench/RESULTS_slider.md`` between its ``bench:start`` / ``bench:end`` markers (the notes below them
stay). Needs ``selenium`` and Debian's ``chromium`` + ``chromium-driver``.
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
FLOOR = "floor (one slider, one chart)"

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
_WAIT_FOR_URL = """
const before = arguments[0], done = arguments[arguments.length - 1];
const started = performance.now();
function check() {
  if (location.search !== before) { done(performance.now() - window.__keydown); return; }
  if (performance.now() - started > 30000) { done(-1); return; }
  setTimeout(check, 5);
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


def measure_moves(driver, moves: int, server: bool = False) -> tuple[list[float], list[float]]:
    """Milliseconds from keydown to a changed chart, for ``moves`` alternating right/left steps; with
    ``server``, also from keydown to the page's link showing the new value (the server has it)."""
    wait_for(driver, lambda d: thumb(d) is not None and d.execute_script(_HEIGHTS) is not None, 300, "no slider/chart")
    settle(driver)
    driver.execute_script(_LISTEN)
    times, server_times = [], []
    for move in range(moves + 2):  # two warm-up moves
        handle = thumb(driver)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", handle)
        before, search = driver.execute_script(_HEIGHTS), driver.execute_script("return location.search;")
        driver.execute_script("window.__keydown = null;")
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT if move % 2 == 0 else Keys.ARROW_LEFT).perform()
        elapsed = driver.execute_async_script(_WAIT_FOR_REDRAW, before)
        if elapsed < 0:
            raise RuntimeError("the chart did not change within 30 s of a slider move")
        reached = driver.execute_async_script(_WAIT_FOR_URL, search) if server else None
        if reached is not None and reached < 0:
            raise RuntimeError("the server did not get the value within 30 s of a slider move")
        if move >= 2:
            times.append(elapsed)
            if reached is not None:
                server_times.append(reached)
        settle(driver)
    return times, server_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=15)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows, server_rows = {}, {}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        driver = browser(folder)
        try:
            with served("bench/floor_app.py", folder) as url:
                driver.get(url)
                rows[FLOOR], _ = measure_moves(driver, args.moves)
            with served("bench/floor_nav_app.py", folder) as url:
                driver.get(url)
                rows["floor in a multipage shell (8 pages, sidebar, fragment)"], _ = measure_moves(driver, args.moves)
            with served("app.py", folder) as url:
                driver.get(f"{url}/prune?model=mlp&data=digits")
                name = "Prune page, mlp (51 k weights)"
                rows[name], server_rows[name] = measure_moves(driver, args.moves, server=True)
                load_factory(driver, url, "bench.common:mlp_25m")
                # a factory model is not in the link (it cannot come back from one): no server column
                rows["Prune page, 25.5 M-parameter MLP"], _ = measure_moves(driver, args.moves)
            with served("bench/floor_app.py", folder, "--runner.postScriptGC", "true") as url:
                driver.get(url)
                rows["floor, Streamlit's default post-run GC"], _ = measure_moves(driver, args.moves)
            with served("app.py", folder, "--runner.postScriptGC", "true") as url:
                driver.get(f"{url}/prune?model=mlp&data=digits")
                name = "Prune page, mlp, Streamlit's default post-run GC"
                rows[name], server_rows[name] = measure_moves(driver, args.moves, server=True)
        finally:
            driver.quit()
    floor = statistics.median(rows[FLOOR])
    lines = [
        "<!-- bench:start -->",
        "# Slider latency in a real browser (keydown to redrawn chart)",
        "",
        f"{datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"streamlit {streamlit.__version__}, load average before the run {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}; headless Debian Chromium; {args.moves} moves per page (after 2 warm-up moves), median.",
        "",
        "| page | redrawn, median ms | p90 ms | x floor | server has the value, median ms |",
        "|---|---|---|---|---|",
    ]
    for name, times in rows.items():
        ordered = sorted(times)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        server_median = f"{statistics.median(server_rows[name]):.0f}" if server_rows.get(name) else "-"
        lines.append(f"| {name} | {median:.0f} | {p90:.0f} | {median / floor:.2f} | {server_median} |")
    lines += ["", "Command: `python -m bench.bench_slider --moves " + str(args.moves) + "`", "<!-- bench:end -->"]
    table = "\n".join(lines)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if "<!-- bench:start -->" in old and "<!-- bench:end -->" in old:
        table = old[:old.index("<!-- bench:start -->")] + table + old[old.index("<!-- bench:end -->") + len("<!-- bench:end -->"):]
    RESULTS.write_text(table if table.endswith("\n") else table + "\n")
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
