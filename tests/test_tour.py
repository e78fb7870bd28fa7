"""The tour's evidence (computed, not claimed) and the Tour page."""
import pytest
from streamlit.testing.v1 import AppTest

from explorer import pipeline, tour
from explorer.specs import ModelSpec, ScoringSpec
from explorer.zoo import ZOO


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
    result = tour.how_to_decide(*mlp, names=("magnitude", "gradient", "random"), sparsity=0.8)
    assert set(result["accuracy"]) == {"magnitude", "gradient", "random"}
    assert result["accuracy"]["magnitude"] > result["accuracy"]["random"]
    assert set(result["collapse_points"]) == {"magnitude", "gradient"}, "random is no criterion to demo"
    check_collapse_demo(result)


def check_collapse_demo(result):
    """Global has emptied a layer, local has not, and the numbers said on the page are the plans' own."""
    local, glob = result["plans"]["local"], result["plans"]["global"]
    sparsity = result["collapse_sparsity"]
    assert result["collapse_shown"] and glob.collapsed and not local.collapsed
    # independent: local keeps round((1 - s) n) of every layer, so no layer empties
    assert all(lp.kept == lp.total - round(sparsity * lp.total) > 0 for lp in local.layers)
    assert all(lp.kept == 0 for lp in glob.layers if lp.name in glob.collapsed)
    text = tour.collapse_demo_text(result)
    assert f"Shown: **{result['collapse_criterion']} at {sparsity:.1%}**" in text
    assert f"from {tour.collapse_percent(local.collapse_point)} on" in text


@pytest.mark.parametrize("name", list(ZOO))
def test_the_scope_demo_collapses_global_not_local_on_every_zoo_model(name):
    """Untrained weights and magnitude scores: no forward or backward pass, every zoo model in seconds."""
    model, data, _ = pipeline.resolve_model(ModelSpec(name, baseline=False))
    check_collapse_demo(tour.collapse_demo({"magnitude": pipeline.prepare(model, ScoringSpec("unstructured"),
                                                                          dataset=data)}))


def test_the_scope_demo_on_trained_lenet5_picks_a_criterion_that_collapses_first():
    """Trained lenet5: magnitude empties a layer globally only beyond local's own collapse point."""
    model, data, _ = pipeline.resolve_model(ModelSpec("lenet5", baseline=True))
    prepared = {criterion: pipeline.prepare(model, ScoringSpec("unstructured", criterion, calib_batches=2),
                                            dataset=data) for criterion in ("magnitude", "gradient")}
    demo = tour.collapse_demo(prepared)
    check_collapse_demo(demo)
    glob, local = demo["collapse_points"][demo["collapse_criterion"]]
    assert glob < demo["collapse_sparsity"] < local


def test_without_a_gap_the_demo_says_so_from_the_numbers(mlp):
    prepared = {"magnitude": pipeline.prepare(mlp[0], ScoringSpec("unstructured", "magnitude"), dataset=mlp[1])}
    glob, local = tour.collapse_demo(prepared)["collapse_points"]["magnitude"]
    demo = {"collapse_points": {"magnitude": (local, local)}, "collapse_criterion": "magnitude",
            "collapse_sparsity": 0.95, "collapse_shown": False}
    assert tour.collapse_demo_text(demo) == (
        "On this model no criterion makes global scope empty a layer before local scope does "
        f"(global: magnitude {tour.collapse_percent(local)}; local scope empties its smallest layer only from "
        f"{tour.collapse_percent(local)} on), so both are shown with magnitude at 95.0%.")


def test_a_collapse_point_never_reads_100_percent():
    """0.9996 (the mlp's classifier under local scope) read 'only beyond 100.0%': rounded down it says where."""
    assert tour.collapse_percent(0.9996) == "99.9%" and tour.collapse_percent(0.985) == "98.5%"
    assert tour.collapse_percent(1.0) == "100.0%"


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
    assert set(over_time) == {"one_shot", "iterative, 6 rounds"} and all(r["metrics"] for r in over_time.values())
    # question 3 at a budget where rounds help (95 %, 8 epochs: bench/RESULTS_methods.md), read from its numbers
    single, stepped = (over_time[n]["metrics"]["accuracy"] for n in ("one_shot", "iterative, 6 rounds"))
    assert stepped > single
    reading = [m.value for m in at.markdown if m.value.startswith("Here the rounds")]
    assert reading == [tour.over_time_text(over_time, 8, 6, 0.95)] and f"{stepped:.1%}" in reading[0]
    assert len([e for e in at.get("page_link")]) >= 3


def test_question_three_reads_its_result_from_the_numbers():
    won = {"one_shot": {"metrics": {"accuracy": 0.846}}, "iterative, 6 rounds": {"metrics": {"accuracy": 0.929}}}
    text = tour.over_time_text(won, 8, 6, 0.95)
    assert text.startswith("Here the rounds helped: 6 cuts to 95% end at 92.9% against 84.6% for one cut (+8.3 points)")
    assert "only 2 of the 8 epochs" in text  # split_budget(8, 6) = [1, 1, 1, 1, 2, 2]
    lost = {"one_shot": {"metrics": {"accuracy": 0.941}}, "iterative": {"metrics": {"accuracy": 0.844}}}
    text = tour.over_time_text(lost, 3, 3, 0.9)
    assert text.startswith("Here the rounds did not help: 3 cuts to 90% end at 84.4% against 94.1% for one cut "
                           "(-9.7 points). One cut had all 3 epochs to recover, the last of the rounds only 1")
    assert tour.over_time_text({"one_shot": {"metrics": {"accuracy": 0.9}}, "iterative": {"metrics": None}}, 3, 3, 0.9) \
        is None
