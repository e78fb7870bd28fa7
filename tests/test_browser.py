"""One real-browser smoke test: `streamlit run app.py` headless, driven by Debian's Chromium.

Opens a link to the Prune page on a fresh server (the default model trains), moves the sparsity slider
with the keyboard and checks that the per-layer chart changed. Screenshots go to a temporary
folder and, with SAVE_SCREENSHOTS=1, one per page to docs/screenshots/ for the README.

The walk (issue 21): every page (load, inspect, prune, apply, reload, fine-tune, methods, sensitivity, compare,
deploy, the Tour with its three steps computed) in a wide and a narrow window, a screenshot of each under the
test's folder (and in $PRUNING_EXPLORER_SCREENSHOTS when set); no chart of height 0 and no chart title under its
toolbar, the pruned copy back after a reload, the query kept by the sidebar links, and no static-folder warning
from the server. A second walk opens MiniLM (37 layers): its Prune and Inspect pages at both sizes.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The app served headless on a free port, with its own data and cache folders; always stopped."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",  # no downloads at run time: MiniLM comes from its wheel
           "PRUNING_EXPLORER_DATA": os.environ.get("PRUNING_EXPLORER_DATA", str(tmp_path / "data")),
           "PRUNING_EXPLORER_CACHE": os.environ.get("PRUNING_EXPLORER_CACHE", str(tmp_path / "cache"))}
    log = open(tmp_path / "streamlit.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
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
                raise RuntimeError("streamlit did not start:\n" + (tmp_path / "streamlit.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1500,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 120, message: str = ""):
    def safe(d):
        try:
            return condition(d)
        except (StaleElementReferenceException, WebDriverException):
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(safe, message)


def idle(driver) -> bool:
    """The script finished its run: Streamlit shows no 'running' indicator."""
    return not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')


def settle(driver, timeout: float = 120) -> None:
    time.sleep(0.5)
    wait_for(driver, idle, timeout, "the app kept running")
    time.sleep(0.5)


def open_page(driver, title: str) -> None:
    link = wait_for(driver, lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNavLink"]')
                                            if a.text.strip().splitlines()[-1:] == [title]), None), 30, f"no link to {title}")
    link.click()
    wait_for(driver, lambda d: any(h.text.strip() == title for h in d.find_elements(By.TAG_NAME, "h1")), 60,
             f"page {title} did not open")
    settle(driver)


def bar_heights(driver) -> list:
    return driver.execute_script(
        "const plot = document.querySelector('.js-plotly-plot');"
        "if (!plot || !plot._fullData || !plot._fullData.length) return null;"
        "return Array.from(plot._fullData[0].y);")  # _fullData: plotly's decoded copy of the figure


def sparsity_thumb(driver):
    """The live slider's input (app_pages/live_slider.py): its value is a step index, its aria-valuetext the value."""
    found = driver.find_elements(By.CSS_SELECTOR, 'input[type="range"][aria-label^="Sparsity (fraction"]')
    return found[0] if found else None


def sparsity(driver) -> float:
    return float(sparsity_thumb(driver).get_attribute("aria-valuetext"))


def shoot(driver, tmp_path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    if os.environ.get("SAVE_SCREENSHOTS") == "1":
        target = ROOT / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / f"{name}.png")
    return path


def click_button(driver, label: str) -> None:
    button = wait_for(driver, lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button")
                                              if b.text.strip().startswith(label) and b.is_enabled()), None),
                      30, f"no button {label!r}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    settle(driver)


def test_slider_moves_chart(server, browser, tmp_path):
    # The first page a fresh server gets is a link to Prune: app.py must run it (sidebar card, navigation);
    # with a folder named pages/ next to app.py, Streamlit ran that file alone as an old-style page.
    browser.get(f"{server}/prune?model=mlp&data=digits")
    wait_for(browser, lambda d: bar_heights(d) is not None and sparsity_thumb(d) is not None, 300, "no prune chart")
    settle(browser)
    sidebar = browser.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"]').text
    assert "Current model" in sidebar and "Fine-tune" in sidebar and "common" not in sidebar.split(), sidebar
    before = bar_heights(browser)
    assert before and all(abs(y - 0.5) < 0.3 for y in before), before  # 50 % global by default
    assert "25,216 / 50,432" in browser.find_element(By.TAG_NAME, "body").text  # the Units pruned card, 50 %

    thumb = sparsity_thumb(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", thumb)
    keys = ActionChains(browser)
    for _ in range(25):
        keys.send_keys(Keys.ARROW_RIGHT)
    keys.perform()
    wait_for(browser, lambda d: sparsity(d) > 0.5, 30, "the slider did not move")
    settle(browser)
    wait_for(browser, lambda d: bar_heights(d) != before, 60, "the chart did not change")
    after = bar_heights(browser)
    assert sum(after) > sum(before), (before, after)
    assert sparsity(browser) == pytest.approx(0.75)
    screenshot = shoot(browser, tmp_path, "prune")
    assert screenshot.stat().st_size > 10_000

    # A reload is a new browser session: the URL carries the model and the sparsity back.
    wait_for(browser, lambda d: "sparsity=0.75" in d.current_url, 30, "the moved value did not reach the server")
    assert "model=mlp" in browser.current_url
    browser.refresh()
    wait_for(browser, lambda d: sparsity_thumb(d) is not None and bar_heights(d) is not None, 120,
             "the Prune page did not come back after a reload")
    settle(browser)
    assert sparsity(browser) == pytest.approx(0.75)
    assert "mlp" in browser.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"]').text
    assert bar_heights(browser) == after

    assert "37,824 / 50,432" in browser.find_element(By.TAG_NAME, "body").text  # the card followed the slider

    # Apply straight after a move, before the slider has reported it: leaving the slider reports it first.
    thumb = sparsity_thumb(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", thumb)
    apply = next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip().startswith("Apply"))
    ActionChains(browser).send_keys(*[Keys.ARROW_LEFT] * 5).move_to_element(apply).click().perform()  # one burst
    wait_for(browser, lambda d: "Saved" in d.find_element(By.TAG_NAME, "body").text, 120, "apply did not finish")
    assert "global 70%" in browser.find_element(By.TAG_NAME, "body").text

    if os.environ.get("SAVE_SCREENSHOTS") == "1":
        tour_for_screenshots(browser, tmp_path)


def tour_for_screenshots(driver, tmp_path) -> None:
    """The remaining pages with something on them: two applied plans, a fine-tune, the dashboard."""
    open_page(driver, "Model")
    shoot(driver, tmp_path, "model")
    open_page(driver, "Prune")
    click_button(driver, "Apply")
    wait_for(driver, lambda d: "Saved" in d.find_element(By.TAG_NAME, "body").text, 120, "apply did not finish")
    scope = driver.find_element(By.XPATH, '//div[@data-testid="stRadio"][.//p[text()="Scope"]]')  # then the slider
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", scope)
    shoot(driver, tmp_path, "prune")
    open_page(driver, "Inspect")
    click_button(driver, "Collect gradients")
    shoot(driver, tmp_path, "inspect")
    open_page(driver, "Fine-tune")
    click_button(driver, "Start fine-tuning")
    wait_for(driver, lambda d: "Saved" in d.find_element(By.TAG_NAME, "body").text, 300, "fine-tune did not finish")
    settle(driver)
    shoot(driver, tmp_path, "finetune")
    open_page(driver, "Prune")
    driver.find_element(By.XPATH, "//label[.//p[text()='channel']]").click()
    settle(driver)
    click_button(driver, "Apply")
    wait_for(driver, lambda d: "mlp channel" in d.find_element(By.TAG_NAME, "body").text, 120,
             "the channel apply did not finish")  # the saved run's name
    settle(driver)
    shoot(driver, tmp_path, "prune_channel")
    open_page(driver, "Compare")
    shoot(driver, tmp_path, "compare")


SIZES = {"wide": (1500, 1300), "narrow": (820, 1100)}
PAGES = ("Tour", "Model", "Inspect", "Prune", "Fine-tune", "Methods", "Sensitivity", "Compare", "Deploy")


def chart_heights(driver) -> list[float]:
    """The drawn height of every plotly chart on the page (a chart collapsed to 0 by a resize shows here)."""
    return driver.execute_script("return Array.from(document.querySelectorAll('.js-plotly-plot'))"
                                 ".map(p => p.getBoundingClientRect().height);")


def shoot_walk(driver, tmp_path, name: str) -> Path:
    """A screenshot under the test's folder, copied to $PRUNING_EXPLORER_SCREENSHOTS when that is set."""
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    if os.environ.get("PRUNING_EXPLORER_SCREENSHOTS"):
        target = Path(os.environ["PRUNING_EXPLORER_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    assert path.stat().st_size > 10_000
    return path


def titles_under_toolbars(driver) -> list[str]:
    """The chart titles that plotly's toolbar (its modebar, shown on hover) would cover: their boxes intersect."""
    return [title for title in driver.execute_script("""
        return Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot => {
          const bar = plot.querySelector('.modebar'), title = plot.querySelector('.gtitle');
          if (!bar || !title || !title.textContent) return '';
          const a = bar.getBoundingClientRect(), b = title.getBoundingClientRect();
          return a.right > b.left && a.left < b.right && a.bottom > b.top && a.top < b.bottom ? title.textContent : '';
        });""") if title]


def page_is_clean(driver, title: str, model: str = "mlp") -> None:
    """No exception box, no chart of height 0, no chart title under its toolbar, and the sidebar names the model."""
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), title
    assert all(height > 50 for height in chart_heights(driver)), (title, chart_heights(driver))
    assert not titles_under_toolbars(driver), (title, titles_under_toolbars(driver))
    sidebar = driver.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"]').text
    assert model in sidebar and "None loaded yet" not in sidebar, (title, sidebar)


def test_every_page_at_two_window_sizes(server, browser, tmp_path):
    """Load, inspect, prune, apply, reload, fine-tune, methods, sensitivity, compare and deploy in the wide window,
    then every page again in a narrow one; a screenshot of each; the pruned copy survives the reload."""
    browser.set_window_size(*SIZES["wide"])
    browser.get(f"{server}/?model=mlp&data=digits")
    wait_for(browser, lambda d: any(h.text.strip() == "Model" for h in d.find_elements(By.TAG_NAME, "h1")), 300,
             "the Model page did not open")
    settle(browser, 300)
    page_is_clean(browser, "Model")
    shoot_walk(browser, tmp_path, "wide-1-model")

    open_page(browser, "Inspect")
    click_button(browser, "Collect gradients")
    page_is_clean(browser, "Inspect")
    shoot_walk(browser, tmp_path, "wide-2-inspect")

    open_page(browser, "Prune")
    wait_for(browser, lambda d: bar_heights(d) is not None, 120, "no prune chart")
    shoot_walk(browser, tmp_path, "wide-3-prune")
    click_button(browser, "Apply")
    wait_for(browser, lambda d: "Saved" in d.find_element(By.TAG_NAME, "body").text, 300, "apply did not finish")
    settle(browser)
    wait_for(browser, lambda d: "run=" in d.current_url, 30, "the run did not reach the link")
    page_is_clean(browser, "Prune")
    shoot_walk(browser, tmp_path, "wide-4-applied")

    browser.refresh()  # a new session: the pruned copy comes back from its run
    wait_for(browser, lambda d: bar_heights(d) is not None, 300, "the Prune page did not come back after a reload")
    settle(browser)
    open_page(browser, "Fine-tune")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Nothing to fine-tune" not in body and "Pruned copy:" in body, body[:500]
    click_button(browser, "Start fine-tuning")
    wait_for(browser, lambda d: "Saved" in d.find_element(By.TAG_NAME, "body").text, 300, "fine-tune did not finish")
    settle(browser)
    page_is_clean(browser, "Fine-tune")
    shoot_walk(browser, tmp_path, "wide-5-finetune")

    for number, title in enumerate(("Methods", "Sensitivity", "Compare", "Deploy"), start=6):
        open_page(browser, title)
        page_is_clean(browser, title)
        shoot_walk(browser, tmp_path, f"wide-{number}-{title.lower()}")
        assert "model=mlp" in browser.current_url, (title, browser.current_url)  # the sidebar link kept the query

    open_page(browser, "Tour")  # each step's evidence computed on the loaded model (about 25 s on the mlp)
    for step in ("Prune it both ways", "Compare criteria and scopes", "Run one-shot and iterative"):
        click_button(browser, step)
    # step 1 draws one chart, step 2 two plans, step 3 the trajectories: all four before the page is judged
    wait_for(browser, lambda d: len(chart_heights(d)) >= 4 and idle(d), 300, "the Tour's charts did not appear")
    page_is_clean(browser, "Tour")
    shoot_walk(browser, tmp_path, "wide-10-tour")

    browser.set_window_size(*SIZES["narrow"])
    for number, title in enumerate(PAGES, start=1):
        open_page(browser, title)
        page_is_clean(browser, title)
        shoot_walk(browser, tmp_path, f"narrow-{number}-{title.lower()}")
    browser.set_window_size(SIZES["wide"][0], SIZES["wide"][1] + 300)  # taller again: no chart collapses to 0
    time.sleep(1)
    page_is_clean(browser, PAGES[-1])

    log = (tmp_path / "streamlit.log").read_text()
    assert "no static folder found" not in log, log


def test_minilm_prune_and_inspect_read_cleanly_at_two_window_sizes(server, browser, tmp_path):
    """The 37-layer transformer: its plan chart lies on its side (one whole name a row), no chart title under a
    toolbar, histograms with their own titles; at both window sizes, a screenshot of each."""
    for size, (width, height) in SIZES.items():
        browser.set_window_size(width, height)
        browser.get(f"{server}/prune?model=minilm&data=text")
        wait_for(browser, lambda d: bar_heights(d) is not None, 300, "no MiniLM prune chart")
        settle(browser, 300)
        page_is_clean(browser, "Prune", model="minilm")
        layers = browser.execute_script("const p = document.querySelector('.js-plotly-plot');"
                                        "return [p._fullData[0].orientation, p._fullData[0].y.length];")
        assert layers == ["h", 37], layers
        plot = browser.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", plot)
        shoot_walk(browser, tmp_path, f"{size}-minilm-prune")
        open_page(browser, "Inspect")
        page_is_clean(browser, "Inspect", model="minilm")
        plot = browser.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", plot)
        shoot_walk(browser, tmp_path, f"{size}-minilm-inspect")
