"""The Sensitivity page through AppTest: scan as a job, heatmap and order, cancel, suggestion to Prune, export."""
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from explorer import pipeline, sensitivity, suggest
from explorer.recipe import Recipe
from explorer.specs import ScoringSpec
from tests import test_app_transformers as transformers
from tests.apptest import goto, texts, wait_for_job
from tests.test_app import start

PAGE = "app_pages/sensitivity.py"


def wait_for_scan(at: AppTest, timeout: float = 60):
    return wait_for_job(at, "sensitivity_job", timeout, "scan")


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
    at = goto(goto(scanned, "app_pages/prune.py"), PAGE)
    assert at.session_state["sensitivity_job"].done
    assert at.dataframe[0].value["unit"].tolist() == at.session_state["sensitivity_job"].result["scan"].order


def test_cancel_stops_the_scan_keeps_the_cells_done_and_suggests_nothing():
    at = run_scan(goto(start(), PAGE), grid=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], latency=True)  # timing is slow
    job = at.session_state["sensitivity_job"]
    at.button(key="sens_cancel").click().run()
    job.wait(timeout=30)
    at.run()
    assert job.done and job.cancelled
    scan = job.result["scan"]
    assert scan.cancelled and len(scan.cells) < 3 * 9
    assert "Cancelled after" in texts(at.warning)
    assert "finish it" in texts(at.error)  # no suggestion from a partial scan


def test_bad_samples_gives_one_error_line():
    at = run_scan(goto(start(), PAGE), samples=0)
    assert not at.exception
    assert len(at.error) == 1 and "empty" in at.error[0].value
    assert "sensitivity_job" not in at.session_state


def test_suggestion_checks_actual_loads_onto_prune_and_exports_a_recipe_that_replays(scanned):
    at = goto(scanned, PAGE)
    at.radio(key="sens_goal").set_value("Target overall sparsity").run()
    at.slider(key="sens_target").set_value(0.5).run()
    assert not at.error, texts(at.error)
    model = at.session_state["current_model"]
    stored = at.session_state["sensitivity_scans"][(model["key"], ScoringSpec())]
    expected = suggest.suggest(stored["scan"], target_sparsity=0.5, prepared=stored["prepared"])
    assert expected.sparsities and any(value > 0 for value in expected.sparsities.values())

    exported = Recipe.from_dict(yaml.safe_load(at.code[0].value))
    assert exported.plan.scope == "local" and dict(exported.plan.overrides) == expected.sparsities
    assert exported.model == model["spec"] and exported.scoring == ScoringSpec()
    plan = pipeline.preview(stored["prepared"], exported.plan)  # what `explorer run` prunes: the suggestion
    assert {layer.name: layer.sparsity for layer in plan.layers} == pytest.approx(expected.sparsities, abs=1e-3)

    at.button(key="sens_check").click().run()
    assert not at.error and not at.exception, texts(at.error)
    actual = at.session_state["sensitivity_checked"]["suggestion"].actual
    direct = suggest.evaluate(model["module"], model["dataset"], stored["prepared"], expected, split="val", samples=200)
    assert (actual["value"], actual["sparsity"]) == pytest.approx((direct.actual["value"], direct.actual["sparsity"]))
    assert "predicted and actual" in texts(at.info).lower()  # agree, or why they differ

    at.button(key="sens_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="prune_scope").value == "local"
    assert at.multiselect(key="prune_override_layers").value == list(expected.sparsities)
    assert {unit: at.slider(key=f"prune_override_{unit}").value for unit in expected.sparsities} \
        == pytest.approx(expected.sparsities)
    assert at.session_state["recipe"].plan.overrides == expected.sparsities


def test_a_flops_goal_suggests_what_the_core_suggests(scanned):
    at = goto(scanned, PAGE)
    at.radio(key="sens_goal").set_value("Target FLOPs reduction").run()
    at.slider(key="sens_target_flops").set_value(0.4).run()
    assert not at.error and not at.exception, texts(at.error)
    model = at.session_state["current_model"]
    stored = at.session_state["sensitivity_scans"][(model["key"], ScoringSpec())]
    expected = suggest.suggest(stored["scan"], target_flops=0.4, prepared=stored["prepared"])
    assert expected.predicted["flops_reduction"] >= 0.4
    assert Recipe.from_dict(yaml.safe_load(at.code[0].value)).plan.overrides == expected.sparsities
    shown = {m.label: m for m in at.metric}["Predicted FLOPs saved (per input)"]
    assert shown.value == f"{expected.predicted['flops_saved']:,}"


def test_a_transformer_scans_heads_by_its_own_metric():
    at = goto(transformers.load_transformer(transformers.start(), "tiny_bert"), PAGE)
    run_scan(at, structure="head", samples=64, grid=(0.5, 1.0))
    wait_for_scan(at)
    assert not at.error, texts(at.error)
    scan = at.session_state["sensitivity_job"].result["scan"]
    assert (scan.metric, scan.measure) == ("fidelity", "top1")
    assert "fidelity (top-1 agreement) on the first 64" in texts(at.caption).lower()
    assert at.dataframe[0].value["unit"].tolist() == scan.order and scan.order
    assert at.number_input(key="sens_max_drop_points").value == 1.0  # agreement reads in points like accuracy


def test_a_failing_scan_and_an_empty_grid_each_give_one_error_line():
    at = goto(start(), PAGE)
    at.selectbox(key="sens_criterion").set_value("sparsegpt")  # weights only: no channel form
    wait_for_scan(run_scan(at, structure="channel"))
    assert len(at.error) == 1 and "sparsegpt" in at.error[0].value, texts(at.error)
    assert not at.session_state["sensitivity_job"].result
    run_scan(at, grid=())
    assert len(at.error) == 1 and "at least one sparsity" in at.error[0].value, texts(at.error)
