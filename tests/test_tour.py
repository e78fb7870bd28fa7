"""The tour's evidence (computed, not claimed) and the Tour page."""
import pytest
from streamlit.testing.v1 import AppTest

from explorer import pipeline, tour
from explorer.specs import ModelSpec


@pytest.fixture(scope="module")
def mlp():
    model, data, _ = pipeline.resolve_model(ModelSpec("mlp"))
    return model, data


def test_what_to_prune_puts_theory_measurement_and_file_size_side_by_side(mlp):
    result = tour.what_to_prune(*mlp)
    unstructured, channel = result["rows"]
    assert unstructured["speedup_flops"] == pytest.approx(1 / 0.1, rel=0.02)  # 90 % of the weights' FLOPs gone
    assert unstructured["compression_ratio"] > 2  # the zeros compress
    assert channel["speedup_flops"] > 2 and channel["compression_ratio"] > 1.5  # half the neurons: ~4x fewer in fc2
    assert result["group"]["real"] > result["group"]["naive"]  # a neuron takes its consumers' inputs with it


def test_how_to_decide_shows_global_collapse_where_local_keeps_every_layer(mlp):
    result = tour.how_to_decide(*mlp, names=("magnitude", "random"), sparsity=0.8)
    assert set(result["accuracy"]) == {"magnitude", "random"}
    assert result["accuracy"]["magnitude"] > result["accuracy"]["random"]
    local, glob = result["plans"]["local"], result["plans"]["global"]
    assert not local.collapsed
    assert all(lp.kept == lp.total - round(0.95 * lp.total) for lp in local.layers)
    assert glob.collapse_point is not None and glob.collapse_point < local.collapse_point


def test_the_tour_page_computes_each_step_on_the_current_model():
    at = AppTest.from_file("../app.py", default_timeout=180)
    at.switch_page("app_pages/tour.py").run()
    assert not at.exception and not at.error
    for step in ("what", "decide", "time"):
        at.button(key=f"tour_{step}").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    evidence = at.session_state["tour_evidence"]
    assert {key[0] for key in evidence} == {"what", "decide", "time"}
    over_time = next(value for key, value in evidence.items() if key[0] == "time")
    assert set(over_time) == {"one_shot", "iterative"} and all(r["metrics"] for r in over_time.values())
    assert len([e for e in at.get("page_link")]) >= 3
