"""The Prune page's live view (app_pages/live_chart.py): one element whose cards and chart update in place.

The numbers it shows are the plan's, checked against a direct count; without static serving the page
falls back to st.metric + st.plotly_chart with the very same values; the plotly.js it serves is the
plotly package's own bundle.
"""
import plotly
import plotly.offline
import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from app_pages import live_chart
from tests.apptest import live_cards, live_view

UNITS = {"fc1": 64 * 256, "fc2": 256 * 128, "classifier": 128 * 10}  # the mlp's weights on 8x8 digits


def prune_page(sparsity: float) -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/prune.py").run()
    at.radio(key="prune_scope").set_value("local").run()
    at.slider(key="prune_sparsity").set_value(sparsity).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def static_serving_off():
    before = config.get_option("server.enableStaticServing")
    config.set_option("server.enableStaticServing", False)
    yield
    config.set_option("server.enableStaticServing", before)


def test_the_live_view_shows_the_plan_local_scope_removes_the_same_fraction_everywhere():
    at = prune_page(0.3)
    view = live_view(at)
    bars = view["figure"]["data"][0]
    assert bars["x"] == list(UNITS)
    # local scope: each layer loses round(0.3 * its weights), whatever their magnitudes
    assert bars["y"] == pytest.approx([round(0.3 * n) / n for n in UNITS.values()])
    pruned = sum(round(0.3 * n) for n in UNITS.values())
    assert live_cards(at)["Units pruned"] == f"{pruned:,} / {sum(UNITS.values()):,}"
    assert view["src"] == f"app/static/plotly-{plotly.__version__}.min.js"
    assert not at.metric and not at.get("plotly_chart")  # one element instead of four metrics and a chart


def test_without_static_serving_the_page_draws_the_same_numbers_with_metrics_and_a_plotly_chart(static_serving_off):
    at = prune_page(0.3)
    assert not at.get("bidi_component")
    metrics = {m.label: m.value for m in at.metric}
    pruned = sum(round(0.3 * n) for n in UNITS.values())
    assert metrics["Units pruned"] == f"{pruned:,} / {sum(UNITS.values()):,}"
    assert {"Parameters after", "FLOPs after (per input)", "Size estimate (float32)"} <= set(metrics)
    assert len(at.get("plotly_chart")) == 1


def test_the_bundle_is_written_once_from_the_plotly_package(tmp_path, monkeypatch):
    monkeypatch.setattr(live_chart, "STATIC", tmp_path / "static")
    assert live_chart.bundle_served()
    written = tmp_path / "static" / f"plotly-{plotly.__version__}.min.js"
    assert written.read_text(encoding="utf-8") == plotly.offline.get_plotlyjs()
    written.write_text("kept")  # present: not rewritten
    assert live_chart.bundle_served() and written.read_text() == "kept"


def test_no_static_serving_means_no_bundle_and_no_file(tmp_path, monkeypatch, static_serving_off):
    monkeypatch.setattr(live_chart, "STATIC", tmp_path / "static")
    assert not live_chart.bundle_served()
    assert not (tmp_path / "static").exists()


def test_an_unwritable_folder_falls_back_instead_of_failing(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(live_chart, "STATIC", blocker / "static")
    assert not live_chart.bundle_served()
