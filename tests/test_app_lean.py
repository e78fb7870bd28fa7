"""The app prunes causal LMs the lean way (`explorer.lean`, issue 22): no scores kept, one pruned copy, the CLI's
masks and the general path's, the page's numbers from a direct computation, Cancel while pruning keeps nothing.

Tiny random GPT-2 (built in) and LLaMA (a folder written here) only; conftest gives each test session its own run
database and caches.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from explorer import hf, lean, masking, pipeline, tasks  # noqa: E402
from explorer.layers import effective_weight, prunable_layers  # noqa: E402
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec  # noqa: E402
from tests.apptest import goto, live_cards, set_sparsity, texts  # noqa: E402
from tests.test_app_transformers import load_transformer, start  # noqa: E402
from explorer.specs import DEFAULT_EVAL_TOKENS  # noqa: E402

CALIB = dict(calib_samples=4, calib_seqlen=32, calib_mode="windows")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    tokenizer = hf.tiny_tokenizer("gpt2")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                                      pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "tiny"
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # coarse weights: ties at the global threshold, across layers and within them
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                parameter.copy_(torch.round(parameter * 50) / 50)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def shaped_calibration(at) -> None:
    at.checkbox(key="prune_calib_shape").check().run()
    at.number_input(key="prune_calib_samples").set_value(CALIB["calib_samples"]).run()
    at.number_input(key="prune_calib_seqlen").set_value(CALIB["calib_seqlen"]).run()
    at.radio(key="prune_calib_mode").set_value(CALIB["calib_mode"]).run()


def preparations(at) -> dict:
    key = at.session_state["current_model"]["key"]
    return {k: v for k, v in at.session_state["prepared_cache"].items() if k[0] == key}


def scoring_of(at) -> ScoringSpec:
    return at.session_state["recipe"].scoring


def nonzero_params(module) -> int:
    return sum(int((parameter != 0).sum()) for parameter in module.parameters())


def test_wanda_on_a_causal_lm_is_lean_and_prunes_the_clis_and_the_general_paths_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    at = load_transformer(start(), "tiny_gpt2")
    goto(at, "app_pages/prune.py")
    assert at.radio(key="prune_scope").value == "local"  # an LLM's default: each layer as the papers prune it
    at.selectbox(key="prune_criterion").set_value("wanda").run()
    shaped_calibration(at)
    set_sparsity(at, 0.5)
    assert not at.exception and not at.error, texts(at.error)
    assert "Lean path" in texts(at.caption) and "block by block" in texts(at.caption)
    scoring = ScoringSpec(criterion="wanda", **CALIB)
    cache = preparations(at)
    assert all(key[-1] == "lean" for key in cache)  # no full preparation (a score per weight) beside them
    prepared = cache[(at.session_state["current_model"]["key"], scoring, "lean")]
    assert prepared.lean
    assert prepared.scores == {} and prepared.ranking.layer_keys.size == 0 and prepared.hessians == {}
    model = at.session_state["current_model"]["module"]
    dataset = at.session_state["current_model"]["dataset"]
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    general = pipeline.prepare(model, scoring, dataset=dataset)
    general_plan = pipeline.preview(general, PlanSpec(sparsity=0.5))
    cards = live_cards(at)
    estimate = pipeline.estimate(general, general_plan)
    assert cards["Units pruned"].replace(",", "") == f"{general_plan.pruned} / {general_plan.total}"
    assert cards["Parameters after"].replace(",", "") == str(estimate["params_after"])

    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    result = at.session_state["pruned_result"]
    pruned, metrics = result["module"], result["metrics"]
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in base.items())  # base intact
    assert not masking.current_masks(pruned)  # plain zeros: no mask, no weight_orig beside each weight
    cli = pipeline.prepare(model, scoring, dataset=dataset, lean=True)  # what `prune` does when lean.refusal is None
    cli_pruned = pipeline.apply(model, cli, pipeline.preview(cli, PlanSpec(sparsity=0.5)))
    expected = pipeline.apply(model, general, general_plan)
    for name, module in prunable_layers(pruned):
        weight = effective_weight(module)
        assert torch.equal(weight, effective_weight(cli_pruned.get_submodule(name))), name
        assert torch.equal(weight, effective_weight(expected.get_submodule(name))), name
    assert metrics["params_nonzero"] == nonzero_params(pruned)
    budget = DEFAULT_EVAL_TOKENS  # both perplexities on the default token budget
    assert metrics["task"]["pruned"] == pytest.approx(tasks.perplexity(pruned, dataset, max_tokens=budget), rel=1e-6)
    assert metrics["task"]["base"] == pytest.approx(tasks.perplexity(model, dataset, max_tokens=budget), rel=1e-6)
    zeros = sum(int((effective_weight(m) == 0).sum()) for _, m in prunable_layers(pruned))
    total = sum(effective_weight(m).numel() for _, m in prunable_layers(model))
    assert metrics["sparsity_actual"] == pytest.approx(zeros / total)
    assert zeros == general_plan.pruned + sum(int((effective_weight(m) == 0).sum()) for _, m in prunable_layers(model))


def test_global_magnitude_on_a_llama_folder_plans_exactly_and_inspect_draws_the_same_cuts(tmp_path, monkeypatch,
                                                                                          llama_folder):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    at = load_transformer(start(), "local Hugging Face folder", folder=llama_folder)
    goto(at, "app_pages/prune.py")
    at.radio(key="prune_scope").set_value("global").run()
    set_sparsity(at, 0.6)
    assert "Lean path" in texts(at.caption) and "global cut" in texts(at.caption)
    (key, prepared), = preparations(at).items()
    assert key[-1] == "lean" and prepared.scores == {} and prepared.ranking.layer_keys.size == 0
    model, dataset = at.session_state["current_model"]["module"], at.session_state["current_model"]["dataset"]
    general = pipeline.prepare(model, ScoringSpec(), dataset=dataset)
    spec = PlanSpec(sparsity=0.6, scope="global")
    plan = pipeline.preview(general, spec)
    shown = at.session_state["prune_plan"]
    assert [(lp.name, lp.pruned) for lp in shown.layers] == [(lp.name, lp.pruned) for lp in plan.layers]
    assert (shown.collapse_point, shown.collapse_layer) == (plan.collapse_point, plan.collapse_layer)
    collapse = f"{100 * plan.collapse_point:.1f} %"
    assert collapse in texts(at.info) and plan.collapse_layer in texts(at.info)
    at.session_state["prune_table_open"] = True
    at.run()
    table = at.dataframe[0].value.set_index("layer")
    assert {name: int(table.loc[name, "pruned"]) for name in table.index} == {lp.name: lp.pruned for lp in plan.layers}
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    pruned = at.session_state["pruned_result"]["module"]
    expected = masking.current_masks(pipeline.apply(model, general, plan))
    for name, module in prunable_layers(pruned):
        weight = effective_weight(module)
        if name in expected:
            assert torch.equal(weight != 0, expected[name]), name
        assert torch.equal(weight[weight != 0], effective_weight(model.get_submodule(name))[weight != 0]), name

    goto(at, "app_pages/inspect.py")  # the |w| cut of the Prune page's plan, from the shown layers' weights only
    assert not at.error and "layers shown only" in texts(at.caption)
    chosen = [name for name in at.multiselect[0].value if name in plan.names()] \
        if hasattr(plan, "names") else at.multiselect[0].value
    cuts = pipeline.thresholds(general, plan)
    figure = json.loads(next(c for c in at.get("plotly_chart") if "inspect_weights" in str(c.proto.id)).proto.spec)
    drawn = sorted({round(shape["x0"], 9) for shape in figure["layout"].get("shapes", []) if shape["x0"] > 0})
    assert drawn == sorted({round(cuts[name], 9) for name in chosen if cuts.get(name) is not None})
    assert drawn  # the shown layers lose weights at 60 %


def test_global_wanda_takes_the_general_path_and_says_so_then_local_drops_its_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    at = load_transformer(start(), "tiny_gpt2")
    goto(at, "app_pages/prune.py")
    at.selectbox(key="prune_criterion").set_value("wanda").run()
    at.radio(key="prune_scope").set_value("global").run()
    assert not at.error and "General path" in texts(at.caption) and "global scope" in texts(at.caption)
    assert [key[-1] for key in preparations(at)][-1] == scoring_of(at)  # after the lean ones, global Wanda's
    assert preparations(at)[(at.session_state["current_model"]["key"], scoring_of(at))].scores
    at.radio(key="prune_scope").set_value("local").run()
    assert all(key[-1] == "lean" for key in preparations(at)) and "Lean path" in texts(at.caption)  # scores let go

    from app_pages import common  # a model whose scores would not fit: one line and a way out, nothing scored
    free = common.memory_available()  # this machine's, from /proc/meminfo
    assert free is None or 2 ** 20 < free < 2 ** 50
    model_bytes = sum(p.numel() * p.element_size() for p in at.session_state["current_model"]["module"].parameters())
    monkeypatch.setattr(common, "memory_available", lambda: 9 * model_bytes)
    at.radio(key="prune_scope").set_value("global").run()
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value
    assert "more than the" in at.error[0].value and "Use local scope" in at.error[0].value
    assert all(key[-1] == "lean" for key in preparations(at))
    at.button(key="prune_lean_local").click().run()
    assert not at.error and at.radio(key="prune_scope").value == "local" and "Lean path" in texts(at.caption)


def test_cancel_while_the_lean_prune_runs_keeps_nothing_and_the_page_applies_again(tmp_path, monkeypatch):
    import threading

    from app_pages import common
    from explorer.store import RunStore

    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    real, reached, release = lean.prune, threading.Event(), threading.Event()

    def held(*args, progress=None, **kwargs):
        def gate(fraction, line):  # the first block is done: the user presses Cancel here
            reached.set()
            release.wait(60)
            progress(fraction, line)
        return real(*args, progress=gate, **kwargs)

    at = load_transformer(start(), "tiny_gpt2")
    goto(at, "app_pages/prune.py")
    at.selectbox(key="prune_criterion").set_value("wanda").run()
    set_sparsity(at, 0.5)
    model = at.session_state["current_model"]["module"]
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    monkeypatch.setattr(lean, "prune", held)
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)
    at.button(key="prune_apply").click().run()
    job = at.session_state["apply_job"]
    assert reached.wait(60)
    at.run()
    assert at.button(key="prune_apply").disabled and "Apply: Pruning a copy" in at.get("progress")[0].proto.text
    at.button(key="prune_apply_cancel").click().run()
    release.set()
    assert job.wait(60) and job.cancelled and job.result is None
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert "nothing was kept" in texts(at.info) and "block 1 of 2" in texts(at.info)
    assert "pruned_result" not in at.session_state and "apply_job" not in at.session_state
    assert RunStore().list() == []
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in base.items())

    monkeypatch.setattr(lean, "prune", real)
    monkeypatch.setattr(common, "JOB_WAIT_S", 3600.0)
    assert not at.button(key="prune_apply").disabled
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.session_state["pruned_result"]["run_id"] is not None


@pytest.mark.parametrize("kind", ["tiny_gpt2", "llama"])
def test_lean_magnitude_orders_and_cuts_equal_the_ranked_ones_at_every_slider_step(kind, llama_folder):
    source = "tiny_gpt2" if kind == "tiny_gpt2" else f"hf:{llama_folder}"
    model, dataset, _ = pipeline.resolve_model(ModelSpec(source, data="text"))
    general = pipeline.prepare(model, ScoringSpec(), dataset=dataset)
    prepared = pipeline.prepare(model, ScoringSpec(), dataset=dataset, lean=True)
    for scope in ("global", "local"):
        for step in lean.MagnitudeOrder.GRID[::7] + (0.99, 1.0):
            spec = PlanSpec(sparsity=step, scope=scope)
            plan, ranked = pipeline.preview(prepared, spec), pipeline.preview(general, spec)
            assert [lp.pruned for lp in plan.layers] == [lp.pruned for lp in ranked.layers], (scope, step)
            assert (plan.collapse_point, plan.collapse_layer) == (ranked.collapse_point, ranked.collapse_layer)
            if step in (0.0, 0.5, 0.99):
                assert pipeline.thresholds(prepared, plan) == pipeline.thresholds(general, ranked)
    names = list(prepared.names)[:2]
    assert pipeline.thresholds(prepared, plan, names=names).keys() == set(names)
    order = prepared.ranking.order
    assert len(order._answers) >= 100  # the second question answered the whole slider at once


def test_a_cancel_between_two_perplexity_batches_stops_the_measurement_there():
    import threading

    model, dataset, _ = pipeline.resolve_model(ModelSpec("tiny_gpt2", data="text"))
    prepared = pipeline.prepare(model, ScoringSpec(), dataset=dataset, lean=True)
    pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5)))
    cancel, lines = threading.Event(), []

    def follow(fraction, line):
        lines.append(line)
        if "batch" in line:  # the user presses Cancel while the first batch's perplexity is reported
            cancel.set()

    metrics = pipeline.measure_run(model, pruned, dataset, base_task_value=1.0, cancel=cancel, progress=follow)
    batches = [line for line in lines if "batch" in line]
    assert len(batches) == 1 and metrics["cancelled"] == "evaluate"  # stopped after one batch, not after all
    assert metrics["task"]["pruned"] is None and metrics["task"]["base"] == 1.0 and metrics["latency_ms"] is None
    assert metrics["params_nonzero"] == nonzero_params(pruned)


def test_a_language_models_base_perplexity_has_a_bar_and_cancel_keeps_the_model_before(monkeypatch):
    import threading

    from app_pages import common

    real, reached, release = tasks.perplexity, threading.Event(), threading.Event()

    def held(*args, progress=None, **kwargs):
        def gate(fraction, line):  # the first batch is done: the user sees the bar here
            reached.set()
            release.wait(60)
            progress(fraction, line)
        return real(*args, progress=gate, **kwargs)

    monkeypatch.setattr(common, "BASE_TASKS", {})  # this server has not measured tiny_gpt2 yet
    monkeypatch.setattr(tasks, "perplexity", held)
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)
    at = load_transformer(start(), "tiny_gpt2")
    job = at.session_state["model_train_job"]
    assert reached.wait(60)
    at.run()
    assert "Measuring the base perplexity of tiny_gpt2" in at.get("progress")[0].proto.text
    at.button(key="model_train_cancel").click().run()
    release.set()
    assert job.wait(60) and job.result is None
    at.run()
    assert not at.exception and not at.error and "current_model" not in at.session_state
    assert "cancelled while its base perplexity was measured" in texts(at.info) and common.BASE_TASKS == {}

    reached.clear()
    monkeypatch.setattr(common, "JOB_WAIT_S", 3600.0)  # loaded again: the script follows the bar to its end
    at.button(key="tf_load").click()
    release.set()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    entry = at.session_state["current_model"]
    assert entry["task"]["base"] == pytest.approx(real(entry["module"], entry["dataset"],
                                                       max_tokens=DEFAULT_EVAL_TOKENS), rel=1e-9)
    assert common.BASE_TASKS["tiny_gpt2"] is entry["task"]


def test_the_apps_base_perplexity_reads_the_default_token_budget_and_a_recipe_with_another_measures_again():
    from app_pages import common
    from explorer.recipe import Recipe
    from explorer.specs import MeasureSpec, ModelSpec as Spec

    model, dataset, _ = pipeline.resolve_model(Spec("tiny_gpt2", data="text"))
    task = common.task_of(model, dataset)
    assert task["base"] == pytest.approx(tasks.perplexity(model, dataset, max_tokens=DEFAULT_EVAL_TOKENS), rel=1e-6)
    assert task["eval_tokens"] == DEFAULT_EVAL_TOKENS and task["tokens"]["scored"] < task["tokens"]["total"]
    entry = {"module": model, "dataset": dataset, "base_accuracy": None, "task": task}
    pruned = pipeline.clone_model(model)
    for recipe_tokens, expected_tokens in ((DEFAULT_EVAL_TOKENS, DEFAULT_EVAL_TOKENS), (0, None), (300, 300)):
        recipe = Recipe(model=Spec("tiny_gpt2", data="text"),
                        measure=MeasureSpec(latency=False, eval_tokens=recipe_tokens))
        metrics = common.measure(entry, pruned, recipe)
        assert metrics["task"]["base"] == pytest.approx(tasks.perplexity(model, dataset, max_tokens=expected_tokens),
                                                        rel=1e-6)  # the base read on the recipe's tokens, never mixed
        assert metrics["task"]["pruned"] == pytest.approx(metrics["task"]["base"], rel=1e-6)  # an unpruned copy
