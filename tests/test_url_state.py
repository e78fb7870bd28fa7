"""State in the URL: a reload, a bookmark or a shared link reopens the same model and Prune settings."""
import pytest
from streamlit.testing.v1 import AppTest

from explorer.recipe import Recipe
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec
from explorer.store import Run, RunStore


def open_page(page: str, **params) -> AppTest:
    """A new browser session (as after a reload) opened straight on ``page`` with a link's parameters."""
    at = AppTest.from_file("../app.py", default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_page_opened_without_a_model_loads_the_default_instead_of_a_dead_end():
    at = open_page("pages/prune.py")
    assert at.session_state["current_model"]["label"] == "mlp"
    assert not at.error and at.slider(key="prune_sparsity").value == 0.5


def test_the_prune_settings_travel_in_the_url_and_come_back_after_a_reload():
    at = open_page("pages/prune.py")
    at.slider(key="prune_sparsity").set_value(0.73).run()
    at.radio(key="prune_scope").set_value("local").run()
    params = dict(at.query_params)
    assert params["model"] == "mlp" and params["data"] == "digits"
    assert params["sparsity"] == "0.73" and params["scope"] == "local"

    reloaded = open_page("pages/prune.py", **params)
    assert reloaded.slider(key="prune_sparsity").value == pytest.approx(0.73)
    assert reloaded.radio(key="prune_scope").value == "local"
    units = 64 * 256 + 256 * 128 + 128 * 10
    metrics = {m.label: m.value for m in reloaded.metric}
    assert metrics["Units pruned"].startswith(f"{round(0.73 * 16384) + round(0.73 * 32768) + round(0.73 * 1280):,}")
    assert metrics["Units pruned"].endswith(f"/ {units:,}")


def test_a_link_to_another_zoo_model_opens_it_with_its_settings():
    at = open_page("pages/prune.py", model="lenet5", data="digits", structure="channel", criterion="magnitude",
                   scope="global", sparsity="0.3")
    assert at.session_state["current_model"]["label"] == "lenet5"
    assert at.radio(key="prune_structure").value == "channel"
    assert at.slider(key="prune_sparsity").value == pytest.approx(0.3)


def test_a_link_to_a_stored_run_reopens_its_model_and_recipe():
    recipe = Recipe(model=ModelSpec(source="mlp", data="digits"), scoring=ScoringSpec("unstructured", "random"),
                    plan=PlanSpec(sparsity=0.42, scope="local"))
    run = RunStore().save(Run.from_recipe(recipe, model_name="mlp", dataset="digits"))
    at = open_page("pages/prune.py", run=str(run.id))
    assert at.selectbox(key="prune_criterion").value == "random"
    assert at.slider(key="prune_sparsity").value == pytest.approx(0.42)
    assert at.radio(key="prune_scope").value == "local"


@pytest.mark.parametrize("params", [{"model": "resnet999"}, {"model": "mlp", "data": "digits", "sparsity": "lots",
                                                               "structure": "blocks"}, {"run": "987654"}])
def test_a_bad_link_falls_back_without_an_error(params):
    at = open_page("pages/prune.py", **params)
    assert at.session_state["current_model"]["label"] == "mlp"
    assert at.slider(key="prune_sparsity").value == 0.5 and at.radio(key="prune_structure").value == "unstructured"
    assert not at.error
