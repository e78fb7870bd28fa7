"""The Prune page's live slider (app_pages/live_slider.py): every step's view sent in advance.

The views it sends are the plans', checked against direct counts; the patches rebuild every view; without
static serving the page falls back to Streamlit's own slider, metrics and chart with the same numbers; the
plotly.js it serves is the plotly package's own bundle.
"""
import random

import plotly
import plotly.offline
import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from app_pages import live_slider
from tests.apptest import live_cards, set_sparsity, shown_view
from tests.apptest import live_slider as sent

UNITS = {"fc1": 64 * 256, "fc2": 256 * 128, "classifier": 128 * 10}  # the mlp's weights on 8x8 digits


def local_prune_page() -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/prune.py").run()
    at.radio(key="prune_scope").set_value("local").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def static_serving_off():
    before = config.get_option("server.enableStaticServing")
    config.set_option("server.enableStaticServing", False)
    yield
    config.set_option("server.enableStaticServing", before)


def test_every_step_is_sent_and_each_matches_a_direct_count():
    at = local_prune_page()
    data = sent(at)
    assert data["values"] == [i / 100 for i in range(101)] and data["values"][data["index"]] == 0.5
    assert data["src"] == f"/app/static/plotly-{plotly.__version__}.min.js"
    for index in (0, 1, 30, 77, 100):
        view = live_slider.apply_patch(data["base"], data["patches"][index])
        sparsity = data["values"][index]
        bars = view["figure"]["data"][0]
        assert bars["x"] == list(UNITS)
        # local scope: each layer loses round(s * its weights), whatever their magnitudes
        assert bars["y"] == pytest.approx([round(sparsity * n) / n for n in UNITS.values()])
        units = {card["label"]: card["value"] for card in view["cards"]}["Units pruned"]
        assert units == f"{sum(round(sparsity * n) for n in UNITS.values()):,} / {sum(UNITS.values()):,}"
    assert not at.metric and not at.get("plotly_chart")  # one element instead of four metrics and a chart


def test_a_value_reported_by_the_browser_becomes_the_plan_apply_uses():
    at = local_prune_page()
    before = sent(at)["version"]
    set_sparsity(at, 0.3)
    assert sent(at)["version"] == before  # same settings: the views are not rebuilt, only the index moves
    assert sent(at)["index"] == 30
    assert at.session_state["prune_plan"].sparsity_requested == pytest.approx(0.3)
    assert live_cards(at)["Units pruned"].startswith(f"{sum(round(0.3 * n) for n in UNITS.values()):,} /")
    at.radio(key="prune_scope").set_value("global").run()
    assert sent(at)["version"] != before and sent(at)["index"] == 30


def test_without_static_serving_the_page_shows_the_same_numbers_with_streamlit_widgets(static_serving_off):
    at = local_prune_page()
    set_sparsity(at, 0.3)
    assert not at.get("bidi_component")
    assert at.select_slider(key="prune_sparsity").value == pytest.approx(0.3)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Units pruned"] == f"{sum(round(0.3 * n) for n in UNITS.values()):,} / {sum(UNITS.values()):,}"
    assert {"Parameters after", "FLOPs after (per input)", "Size estimate (float32)"} <= set(metrics)
    assert len(at.get("plotly_chart")) == 1


def test_patches_rebuild_every_view_exactly():
    rng = random.Random(0)
    base = {"cards": [{"label": "a", "value": "1", "note": ""}], "figure": {"data": [{"y": [0.1, 0.2], "text": ["x", "y"]}],
                                                                            "layout": {"shapes": [{"y0": 0.5}]}},
            "warning": ""}
    for _ in range(200):
        other = {"cards": [{"label": "a", "value": str(rng.randint(0, 9)), "note": rng.choice(["", "n"])}],
                 "figure": {"data": [{"y": [rng.random(), 0.2], "text": rng.choice([["x", "y"], ["x", "y", "z"]])}],
                            "layout": {"shapes": [{"y0": rng.choice([0.5, 0.7])}]}},
                 "warning": rng.choice(["", "**Layer collapse:** `fc2`"])}
        patch = live_slider.json_patch(base, other)
        assert live_slider.apply_patch(base, patch) == other
        for path, value in patch:  # only what differs travels: each patched leaf differs from the base's
            old = base
            for key in path:
                old = old[key]
            assert old != value, path
    assert live_slider.json_patch(base, base) == []
    with pytest.raises(ValueError):
        live_slider.json_patch([1], {"a": 1})


def test_the_bundle_address_follows_the_base_url_path():
    before = config.get_option("server.baseUrlPath")
    try:
        config.set_option("server.baseUrlPath", "/tools/explorer/")
        assert live_slider.bundle_url() == f"/tools/explorer/app/static/plotly-{plotly.__version__}.min.js"
        config.set_option("server.baseUrlPath", "")
        assert live_slider.bundle_url() == f"/app/static/plotly-{plotly.__version__}.min.js"
    finally:
        config.set_option("server.baseUrlPath", before)


def test_the_bundle_is_written_once_from_the_plotly_package(tmp_path, monkeypatch):
    monkeypatch.setattr(live_slider, "STATIC", tmp_path / "static")
    assert live_slider.bundle_served()
    written = tmp_path / "static" / f"plotly-{plotly.__version__}.min.js"
    assert written.read_text(encoding="utf-8") == plotly.offline.get_plotlyjs()
    written.write_text("kept")  # present: not rewritten
    assert live_slider.bundle_served() and written.read_text() == "kept"


def test_no_static_serving_means_no_bundle_and_no_file(tmp_path, monkeypatch, static_serving_off):
    monkeypatch.setattr(live_slider, "STATIC", tmp_path / "static")
    assert not live_slider.bundle_served()
    assert not (tmp_path / "static").exists()


def test_an_unwritable_folder_falls_back_instead_of_failing(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(live_slider, "STATIC", blocker / "static")
    assert not live_slider.bundle_served()


def test_a_changed_list_of_numbers_or_rows_travels_as_one_replacement():
    base = {"figure": {"data": [{"y": [0.1, 0.2, 0.3], "customdata": [[1, 4], [2, 4]], "x": ["a", "b", "c"]}]}}
    other = {"figure": {"data": [{"y": [0.1, 0.5, 0.3], "customdata": [[1, 4], [3, 4]], "x": ["a", "b", "c"]}]}}
    assert live_slider.json_patch(base, other) == [[["figure", "data", 0, "y"], [0.1, 0.5, 0.3]],
                                                   [["figure", "data", 0, "customdata"], [[1, 4], [3, 4]]]]
