"""The Sensitivity page through AppTest: scan as a job, heatmap and order, cancel, suggestion to Prune, export."""
import time

import pytest
import yaml
from streamlit.testing.v1 import AppTest

from explorer import sensitivity
from explorer.specs import ScoringSpec
from tests.test_app import goto, start, texts

PAGE = "pages/sensitivity.py"


def wait_for_scan(at: AppTest, timeout: float = 60):
    """Rerun the page until its scan job is done (cancel it and fail at the deadline)."""
    assert "sensitivity_job" in at.session_state, f"no scan was started; errors: {texts(at.error)}"
    job = at.session_state["sensitivity_job"]
    deadline = time.monotonic() + timeout
    while not job.wait(timeout=0.3):
        if time.monotonic() > deadline:
            job.cancel.set()
            pytest.fail(f"the scan is not done after {timeout} s: {job.fraction:.0%}, '{job.status}'")
        at.run()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return job


def run_scan(at: AppTest, *, structure="unstructured", samples=200, grid=(0.2, 0.5, 0.8), latency=False) -> AppTest:
    at.selectbox(key="sens_structure").set_value(structure)
    at.number_input(key="sens_samples").set_value(samples)
    at.multiselect(key="sens_grid").set_value(list(grid))
    at.checkbox(key="sens_latency").set_value(latency)
    at.button(key="sens_start").click().run()
    return at


@pytest.fixture(scope="module")
def scanned():
    """One session with a finished unstructured magnitude scan of mlp / digits (shared: the scan is the slow part)."""
    at = run_scan(goto(start(), PAGE))
    wait_for_scan(at)
    return at


def test_scan_completes_draws_the_heatmap_and_orders_like_the_core(scanned):
    at = scanned
    assert not at.error, texts(at.error)
    model = at.session_state["current_model"]
    scan = at.session_state["sensitivity_scans"][(model["key"], ScoringSpec())]["scan"]
    direct = sensitivity.scan(model["module"], model["dataset"], ScoringSpec(), sparsities=[0.2, 0.5, 0.8],
                              samples=200)
    assert (scan.sparsities, scan.samples) == ([0.2, 0.5, 0.8], 200)
    assert scan.order == direct.order and len(scan.order) == 3
    assert [c.drop for c in scan.cells] == [c.drop for c in direct.cells]
    assert at.dataframe[0].value["unit"].tolist() == direct.order  # the robust -> fragile table
    assert any(e.label == "What am I looking at?" for e in at.expander)
    assert len(at.get("plotly_chart")) == 2  # heatmap and curves


def test_revisit_shows_the_stored_scan_without_scanning_again(scanned):
    at = goto(goto(scanned, "pages/prune.py"), PAGE)
    assert at.session_state["sensitivity_job"].done
    assert at.dataframe[0].value["unit"].tolist() == at.session_state["sensitivity_job"].result["scan"].order


def test_cancel_stops_the_scan_and_keeps_the_cells_done():
    at = run_scan(goto(start(), PAGE), grid=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], latency=True)  # timing is slow
    job = at.session_state["sensitivity_job"]
    at.button(key="sens_cancel").click().run()
    job.wait(timeout=30)
    at.run()
    assert job.done and job.cancelled
    scan = job.result["scan"]
    assert scan.cancelled and len(scan.cells) < 3 * 9
    assert "Cancelled after" in texts(at.warning)


def test_bad_samples_gives_one_error_line():
    at = run_scan(goto(start(), PAGE), samples=0)
    assert not at.exception
    assert len(at.error) == 1 and "empty" in at.error[0].value
    assert "sensitivity_job" not in at.session_state
