"""Work that survives a reload (issue 21, item 1): the pruned copy comes back from its run, overrides travel in
the link, a page that stops early keeps the query, and a toggle never throws away computed gradients."""
import torch
from streamlit.testing.v1 import AppTest

from explorer.layers import prunable_layers
from tests.apptest import goto, set_sparsity, texts


def open_page(page: str, **params) -> AppTest:
    """A new browser session (as after a reload) opened straight on ``page`` with a link's parameters."""
    at = AppTest.from_file("../app.py", default_timeout=300)  # Apply measures latency: slow on a busy machine
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def zero_fraction(module) -> float:
    weights = [layer.weight.detach() for _, layer in prunable_layers(module)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_a_reload_reopens_the_pruned_copy_from_its_run_for_fine_tune():
    at = open_page("app_pages/prune.py", structure="unstructured", criterion="magnitude", scope="local")
    set_sparsity(at, 0.6)
    at.button(key="prune_apply").click().run()
    pruned = at.session_state["pruned_result"]
    params = dict(at.query_params)
    assert params["run"] == str(pruned["run_id"])

    reloaded = open_page("app_pages/finetune.py", **params)
    assert "Nothing to fine-tune yet" not in texts(reloaded.info)
    again = reloaded.session_state["pruned_result"]
    assert again["run_id"] == pruned["run_id"] and again["metrics"] == pruned["metrics"]
    # the same weights, and the masks are back: a fine-tune keeps the 60 % of every layer at zero
    for (name, before), (_, after) in zip(prunable_layers(pruned["module"]), prunable_layers(again["module"])):
        assert torch.equal(before.weight, after.weight), name
        assert hasattr(after, "weight_mask"), name
    assert abs(zero_fraction(again["module"]) - 0.6) < 0.01
    assert f"Pruned copy: **{pruned['run_name']}**" in texts(reloaded.markdown)


def test_a_run_without_weights_is_replayed_from_its_recipe():
    from explorer import pipeline
    from explorer.recipe import Recipe
    from explorer.specs import MeasureSpec, ModelSpec, PlanSpec, ScoringSpec
    from explorer.store import Run, RunStore

    recipe = Recipe(model=ModelSpec(source="mlp", data="digits"), scoring=ScoringSpec("unstructured", "magnitude"),
                    plan=PlanSpec(sparsity=0.3, scope="local"))
    base, data, _ = pipeline.resolve_model(recipe.model)
    prepared = pipeline.prepare(base, recipe.scoring, dataset=data)
    metrics = pipeline.measure_run(base, pipeline.apply(base, prepared, pipeline.preview(prepared, recipe.plan)), data,
                                   MeasureSpec(latency=False))
    run = RunStore().save(Run.from_recipe(recipe, model_name="mlp", dataset="digits", metrics=metrics))  # no weights
    at = open_page("app_pages/finetune.py", run=str(run.id))
    module = at.session_state["pruned_result"]["module"]
    base = at.session_state["current_model"]["module"]
    for (name, pruned), (_, dense) in zip(prunable_layers(module), prunable_layers(base)):
        weight = pruned.weight.detach()  # local magnitude: the 30 % smallest |w| of each layer are zero
        cut = dense.weight.detach().abs().flatten().kthvalue(round(0.3 * weight.numel())).values
        assert int((weight == 0).sum()) == round(0.3 * weight.numel()), name
        assert bool((dense.weight.detach().abs()[weight == 0] <= cut).all()), name


def test_per_layer_overrides_travel_in_the_link():
    at = open_page("app_pages/prune.py", structure="unstructured", scope="local")
    at.multiselect(key="prune_override_layers").set_value(["fc1", "fc2"]).run()
    at.slider(key="prune_override_fc1").set_value(0.9).run()
    at.slider(key="prune_override_fc2").set_value(0.2).run()
    params = dict(at.query_params)
    assert params["overrides"] == "fc1:0.9,fc2:0.2"

    reloaded = open_page("app_pages/prune.py", **params)
    assert reloaded.multiselect(key="prune_override_layers").value == ["fc1", "fc2"]
    assert reloaded.slider(key="prune_override_fc1").value == 0.9
    plan = reloaded.session_state["prune_plan"]
    assert plan.layer("fc1").pruned == round(0.9 * 64 * 256)
    assert plan.layer("fc2").pruned == round(0.2 * 256 * 128)
    assert plan.layer("classifier").pruned == round(0.5 * 128 * 10)  # the main slider's 50 %


def test_a_page_that_stops_early_keeps_the_query_and_the_sidebar_names_the_model():
    at = open_page("app_pages/finetune.py")  # nothing pruned: the page stops after one line
    assert "Nothing to fine-tune yet" in texts(at.info)
    assert dict(at.query_params)["model"] == "mlp"
    assert "**mlp**" in texts(at.sidebar.markdown)
    at.query_params.clear()  # what a sidebar link does to the URL
    goto(at, "app_pages/compare.py")
    assert dict(at.query_params)["model"] == "mlp"


def test_toggling_the_inspect_axes_keeps_the_collected_gradients():
    at = open_page("app_pages/inspect.py")
    at.button(key="inspect_collect").click().run()
    stored = at.session_state["inspect_gradients"]
    assert at.get("plotly_chart") and any(c.proto.id.endswith("inspect_grads") or "inspect_grads" in c.proto.id
                                          for c in at.get("plotly_chart"))
    at.toggle(key="inspect_shared").set_value(True).run()
    at.slider(key="inspect_bins").set_value(20).run()
    assert at.session_state["inspect_gradients"] is stored
    assert any("inspect_grads" in c.proto.id for c in at.get("plotly_chart"))
    assert "Press the button" not in texts(at.caption)
