"""The app with transformers through AppTest: Model -> Prune -> Compare shows the task metric.

Tiny random BERT / GPT-2 only (the real MiniLM is measured in the CLI and pipeline tests); conftest
gives each test session its own run database, so Compare lists only the runs made here.
"""
import base64
import json
import time

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from explorer import tasks
from explorer.models import load_model
from explorer.store import RunStore
from explorer.specs import DEFAULT_EVAL_TOKENS
from tests.apptest import goto, live_slider, set_sparsity, texts


def start() -> AppTest:
    """A fresh session on the Model page, without the default mlp (whose baseline would train first)."""
    at = AppTest.from_file("../app.py", default_timeout=120)
    at.session_state["model_autoloaded"] = True
    at.run()
    assert not at.exception, at.exception
    assert "current_model" not in at.session_state
    return at


def numbers(array) -> list[float]:
    """A plotly array as sent to the browser: a list, or {dtype, bdata} base64-packed."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def load_transformer(at: AppTest, name: str, *, folder: str = "") -> AppTest:
    goto(at, "app_pages/model.py")
    at.radio(key="model_source").set_value("Transformer").run()
    at.selectbox(key="tf_model").set_value(name).run()
    if folder:
        at.text_input(key="tf_folder").set_value(folder).run()
    at.button(key="tf_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def apply(at: AppTest, structure: str, sparsity: float) -> dict:
    goto(at, "app_pages/prune.py")
    at.radio(key="prune_structure").set_value(structure).run()
    at.selectbox(key="prune_criterion").set_value("magnitude").run()
    set_sparsity(at, sparsity)
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    return at.session_state["pruned_result"]["metrics"]


def test_tiny_bert_heads_and_tiny_gpt2_reach_compare_with_their_task_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))  # a run database of this test's runs only
    at = start()
    load_transformer(at, "tiny_bert")
    model = at.session_state["current_model"]
    assert (model["label"], model["source"], model["dataset"].name) == ("tiny_bert", "transformer", "text")
    assert model["task"] == {"name": "fidelity", "measure": "top1", "base": 1.0, "higher_is_better": True}
    assert model["spec"].data == "text" and model["spec"].data_file is None
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Baseline fidelity (top-1 agreement) (test)"] == "100.0 %"
    assert "hf.bert.encoder.layer.0.attention.self.query" in at.dataframe[0].value["name"].tolist()

    bert = apply(at, "head", 0.5)
    assert bert["task"]["name"] == "fidelity" and bert["task"]["base"] == 1.0
    assert bert["accuracy"] is None
    shown = {m.label: m.value for m in at.metric}
    assert shown["Fidelity (top-1 agreement)"] == f"{100 * bert['task']['pruned']:.1f} %"
    assert bert["params_total"] < bert["baseline_params_total"]  # heads physically removed
    # the run keeps its weights: the head-pruned BERT reloads with its head counts and computes the same
    (bert_run,) = RunStore().list()
    reloaded = load_model(RunStore().weights_path(bert_run.id)).eval()
    x = model["dataset"].example_input(4)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), at.session_state["pruned_result"]["module"].eval()(x), atol=1e-5)

    load_transformer(at, "tiny_gpt2")
    gpt2 = at.session_state["current_model"]
    assert gpt2["task"]["name"] == "perplexity" and gpt2["task"]["higher_is_better"] is False
    # an independent computation of the dense model's perplexity on the same test tokens: the default budget's
    budgeted = tasks.perplexity(gpt2["module"], gpt2["dataset"], max_tokens=DEFAULT_EVAL_TOKENS)
    assert gpt2["task"]["base"] == pytest.approx(budgeted, rel=1e-6)
    scored, total = tasks.eval_tokens(gpt2["dataset"], "test", DEFAULT_EVAL_TOKENS)
    assert gpt2["task"]["tokens"] == {"scored": scored, "total": total} and scored < total
    (card,) = [m for m in at.metric if m.label == "Baseline perplexity (test)"]
    assert f"Scored on the first {scored:,} of {total:,} test tokens" in card.help
    goto(at, "app_pages/prune.py")
    at.radio(key="prune_structure").set_value("nm").run()
    assert "fixes the sparsity at 50%" in texts(at.caption)
    assert live_slider(at)["disabled"]
    at.selectbox(key="prune_nm").set_value("4:8").run()
    assert at.session_state["recipe"].scoring.nm == "4:8"
    gpt2_run = apply(at, "unstructured", 0.5)
    assert gpt2_run["task"]["name"] == "perplexity"
    assert gpt2_run["task"]["base"] == pytest.approx(gpt2["task"]["base"])  # passed in, not recomputed
    assert gpt2_run["task"]["pruned"] > 0

    goto(at, "app_pages/compare.py")
    assert not at.error, texts(at.error)
    at.selectbox(key="cmp_model").set_value("all models").run()
    table = at.dataframe[0].value
    by_model = {row["model"]: row for _, row in table.iterrows()}
    assert by_model["tiny_bert on text"]["metric"] == "fidelity (top-1 agreement)"
    assert by_model["tiny_bert on text"]["metric value"] == pytest.approx(bert["task"]["pruned"])
    scored, total = tasks.eval_tokens(gpt2["dataset"], "test", DEFAULT_EVAL_TOKENS)  # what the default budget reads
    label = f"perplexity · {'all' if scored >= total else f'first {scored:,} of'} {total:,} tokens"
    assert by_model["tiny_gpt2 on text"]["metric"] == label
    assert by_model["tiny_gpt2 on text"]["metric value"] == pytest.approx(gpt2_run["task"]["pruned"])
    assert "accuracy" not in table.columns  # nothing here is judged by accuracy
    picker = at.selectbox(key="cmp_metric")
    assert set(picker.options) == {"fidelity (top-1 agreement)", label}
    picker.set_value(label).run()
    assert not at.exception
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert figure["layout"]["yaxis"]["title"]["text"] == f"{label} (lower is better)"
    plotted = [y for trace in figure["data"] for y in numbers(trace["y"])]
    assert plotted == pytest.approx([gpt2_run["task"]["pruned"]])
    assert len(RunStore().list()) == 2

    # Fine-tune trains the language model on its text (next-token loss) and reports perplexity.
    goto(at, "app_pages/finetune.py")
    assert "perplexity before fine-tuning" in texts(at.markdown) and "next-token" in texts(at.caption)
    at.number_input(key="ft_epochs").set_value(1)
    at.selectbox(key="ft_batch").set_value(256)
    at.button(key="ft_start").click().run()
    job = at.session_state["finetune_job"]
    deadline = time.monotonic() + 120
    while not job.payload().get("step_loss") and time.monotonic() < deadline:
        time.sleep(0.2)
    job.cancel.set()  # two or three steps are enough to show the path; the partial copy is measured
    assert job.wait(timeout=120)
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert job.result.history[-1]["metric"] == "perplexity" and job.result.history[-1]["loss_kind"] == "next_token"
    shown = {m.label: m.value for m in at.metric}
    saved = job.meta["saved_run"]
    assert saved.metrics["task"]["name"] == "perplexity"
    assert saved.metrics["task"]["pruned"] > 100  # a random GPT-2: perplexity in the thousands, shown as an integer
    assert shown["Perplexity after fine-tune"] == f"{saved.metrics['task']['pruned']:,.0f}"
    assert len(RunStore().list()) == 3


def test_a_head_group_shows_its_real_and_naive_cost_per_head():
    at = start()
    load_transformer(at, "tiny_bert")
    goto(at, "app_pages/prune.py")
    at.radio(key="prune_structure").set_value("head").run()
    at.selectbox(key="prune_criterion").set_value("magnitude").run()
    at.radio(key="prune_scope").set_value("local").run()
    set_sparsity(at, 0.5)  # local: 2 of the 4 heads of every layer
    at.selectbox(key="prune_group_layer").set_value("hf.bert.encoder.layer.0.attention.self.query").run()
    assert not at.error and not at.exception, texts(at.error)
    config = at.session_state["current_model"]["module"].hf.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    # one head: head_dim rows (weights and bias) of query, key and value, and head_dim input columns of the output
    real = head_dim * (3 * (hidden + 1) + hidden)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Heads in group"] == str(heads) and "2 removed" in next(
        m.delta for m in at.metric if m.label == "Heads in group")
    assert metrics["Params per head, real"] == f"{real:,}"
    assert metrics["Params per head, naive"] == f"{head_dim * (hidden + 1):,}"  # the query slice alone


def test_a_bad_hf_folder_is_one_error_line_and_the_previous_model_stays(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model\n")
    at = start()
    load_transformer(at, "tiny_bert")
    load_transformer(at, "local Hugging Face folder", folder=str(tmp_path))
    assert len(at.error) == 1 and str(tmp_path) in at.error[0].value and "config.json" in at.error[0].value
    assert "\n" not in at.error[0].value
    assert at.session_state["current_model"]["label"] == "tiny_bert"

    goto(at, "app_pages/inspect.py")  # 14 Linear layers: grouped by block, one block's histograms at a time
    assert not at.error, texts(at.error)
    blocks = at.selectbox(key="inspect_block")
    assert blocks.options == ["all blocks", "hf.bert.encoder.layer.0", "hf.bert.encoder.layer.1", "(outside blocks)"]
    assert blocks.value == "hf.bert.encoder.layer.0"
    assert all(name.startswith("hf.bert.encoder.layer.0.")
               for name in at.multiselect(key="inspect_layers_hf.bert.encoder.layer.0").value)
    per_block = at.dataframe[-1].value
    assert per_block.index.tolist() == ["hf.bert.encoder.layer.0", "hf.bert.encoder.layer.1"]
    query = at.session_state["current_model"]["module"].hf.bert.encoder.layer[1].attention.self.query.weight
    assert per_block.loc["hf.bert.encoder.layer.1", "attention.self.query"] == pytest.approx(
        float(query.detach().abs().mean()), rel=1e-5)
    assert "no classes to attribute" in texts(at.caption)  # conductance needs labels: said, not crashed
    at.button(key="inspect_collect").click().run()  # gradients work without labels (sampled-label Fisher loss)
    assert not at.error and not at.exception, texts(at.error)
    gradients = at.session_state["inspect_gradients"][1]
    assert set(gradients) >= {"hf.bert.encoder.layer.0.attention.self.query"}
    assert all(float(grad.abs().mean()) > 0 for _kind, grad in gradients.values())  # name -> (kind, mean gradient)


def test_head_on_a_plain_network_and_sparsegpt_by_channel_are_the_library_errors():
    at = start()
    at.radio(key="model_source").set_value("Python factory").run()
    at.number_input(key="factory_epochs").set_value(0).run()
    at.button(key="factory_load").click().run()
    assert at.session_state["current_model"]["task"]["name"] == "accuracy"
    goto(at, "app_pages/prune.py")
    at.radio(key="prune_structure").set_value("head").run()
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value
    at.radio(key="prune_structure").set_value("channel").run()
    at.selectbox(key="prune_criterion").set_value("sparsegpt").run()
    assert not at.exception and len(at.error) == 1 and "sparsegpt" in at.error[0].value


def test_the_methods_lab_runs_a_language_model_in_perplexity():
    from tests.apptest import wait_for_job

    at = load_transformer(start(), "tiny_gpt2")
    goto(at, "app_pages/methods.py")
    assert not at.exception and not at.error
    assert "judged by perplexity" in texts(at.info)
    assert at.multiselect(key="methods_chosen").value == ["one_shot", "gradual"]  # the cheap defaults
    assert (at.slider(key="methods_sparsity").value, at.number_input(key="methods_epochs").value) == (0.5, 1)
    at.multiselect(key="methods_chosen").set_value(["one_shot"])
    at.button(key="methods_start").click().run()
    job = wait_for_job(at, "methods_job", 300, "methods")
    assert not at.exception and not at.error, texts(at.error)
    (result,) = job.result
    task = result.metrics["task"]
    assert task["measure"] == "perplexity" and result.metrics["accuracy"] is None
    epochs = [p for p in result.trajectory if p["event"] == "epoch"]
    assert epochs and all(p["metric"] == "perplexity" and p["val_metric"] > 1 for p in epochs)
    table = at.dataframe[0].value
    assert table["perplexity"].tolist() == pytest.approx([task["pruned"]])
    assert table["dense perplexity"].tolist() == pytest.approx([task["base"]])
    curves = [c for c in at.get("plotly_chart") if "methods_curves" in str(c.proto.id)]
    figure = json.loads(curves[-1].proto.spec)
    assert figure["layout"]["annotations"][0]["text"] == "validation perplexity"
    assert numbers(figure["data"][0]["y"]) == pytest.approx([p["val_metric"] for p in epochs])
    assert not [w for w in at.warning if "ended at chance" in w.value]


@pytest.mark.parametrize("page", ["app_pages/tour.py"])
def test_pages_that_train_say_so_for_a_model_judged_by_perplexity(page):
    at = load_transformer(start(), "tiny_gpt2")
    goto(at, page)
    assert "judged by perplexity" in texts(at.info) and not at.error


def test_prune_page_llm_expander_keeps_the_head_dense_and_shapes_calibration(tmp_path, monkeypatch):
    """prune_include_head, prune_sequential, prune_calib_shape, prune_calib_samples / _seqlen / _mode: masks as the pipeline's."""
    from explorer import pipeline
    from explorer.layers import effective_weight
    from explorer.specs import PlanSpec, ScoringSpec

    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    at = load_transformer(start(), "tiny_gpt2")
    goto(at, "app_pages/prune.py")
    at.selectbox(key="prune_criterion").set_value("wanda").run()
    assert "hf.lm_head" not in at.multiselect(key="prune_protect").options  # the papers' default
    at.checkbox(key="prune_include_head").check().run()
    assert "hf.lm_head" in at.multiselect(key="prune_protect").options
    at.checkbox(key="prune_include_head").uncheck().run()
    at.checkbox(key="prune_calib_shape").check().run()
    at.number_input(key="prune_calib_samples").set_value(5).run()
    at.number_input(key="prune_calib_seqlen").set_value(48).run()
    at.radio(key="prune_calib_mode").set_value("windows").run()
    at.checkbox(key="prune_sequential").check().run()
    set_sparsity(at, 0.5)
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    result = at.session_state["pruned_result"]
    scoring = result["recipe"].scoring
    assert (scoring.calib_samples, scoring.calib_seqlen, scoring.calib_mode, scoring.include_head,
            scoring.sequential) == (5, 48, "windows", False, True)
    model, dataset, _ = pipeline.resolve_model(result["recipe"].model)
    prepared = pipeline.prepare(model, ScoringSpec(criterion="wanda", calib_samples=5, calib_seqlen=48,
                                                   calib_mode="windows", sequential=True), dataset=dataset)
    expected = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(0.5, scope="global")))
    pruned = result["module"]
    for name in [*prepared.names, "hf.lm_head"]:
        assert torch.equal(effective_weight(pruned.get_submodule(name)) == 0,
                           effective_weight(expected.get_submodule(name)) == 0), name
    assert bool((effective_weight(pruned.hf.lm_head) != 0).all())
