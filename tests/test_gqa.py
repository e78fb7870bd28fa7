"""Grouped-query attention (LLaMA-shaped, random weights): whole key/value groups removed, config updated, reloads."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from explorer import compat, gqa, hf, pipeline, planner  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.specs import PlanSpec, ScoringSpec  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A LLaMA-shaped folder written by save_pretrained: hidden 64, 4 query heads, 2 key/value heads, 2 layers."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=64, pad_token_id=0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path):
    return hf.TokenModel(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), "causal_lm", pad_id=0,
                         seq_len=16)


def ids():
    return torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_unit_is_one_key_value_head_with_its_query_heads_and_costs_what_a_removal_frees(folder):
    model = load(folder)
    groups = gqa.kv_groups(model)
    assert [(g.name, g.channels) for g in groups] == [(f"hf.model.layers.{i}.self_attn", KV_HEADS) for i in range(2)]
    # by hand: 2 query heads x 16 rows of q_proj and o_proj columns, 16 rows of k_proj and of v_proj, 64 wide each
    assert groups[0].params_per_channel_real == (2 * HEAD_DIM * HIDDEN) * 2 + (HEAD_DIM * HIDDEN) * 2
    pruned = copy.deepcopy(model)
    gqa.remove_groups(pruned, {g.name: [1] for g in groups})
    assert _params(model) - _params(pruned) == sum(g.params_removed([1]) for g in groups)


def test_removing_a_group_equals_zeroing_its_query_heads_output_columns(folder):
    model = load(folder)
    pruned = copy.deepcopy(model)
    gqa.remove_groups(pruned, {f"hf.model.layers.{i}.self_attn": [0] for i in range(2)})
    zeroed = copy.deepcopy(model)  # independent: query heads 0 and 1 read key/value head 0; their o_proj columns
    with torch.no_grad():
        for layer in zeroed.hf.model.layers:
            layer.self_attn.o_proj.weight[:, : 2 * HEAD_DIM] = 0
        torch.testing.assert_close(pruned(ids()), zeroed(ids()), atol=1e-5, rtol=1e-4)


def test_head_structure_prunes_groups_updates_the_config_and_the_folder_reloads(folder, tmp_path):
    model = load(folder)
    prepared = pipeline.prepare(model, ScoringSpec("head", "magnitude"), example_input=ids())
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local"))
    assert [(lp.total, lp.pruned) for lp in plan.layers] == [(KV_HEADS, 1), (KV_HEADS, 1)]
    pruned = pipeline.apply(model, prepared, plan)
    config = pruned.hf.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, HEAD_DIM)
    assert model.hf.config.num_attention_heads == HEADS  # the model given is untouched
    assert gqa.kv_counts(pruned) == {f"hf.model.layers.{i}.self_attn": (2, 1) for i in range(2)}
    removed = {lp.name: planner.pruned_indices(prepared.ranking, plan, lp.name) for lp in plan.layers}
    assert _params(model) - _params(pruned) == sum(g.params_removed(removed[g.name]) for g in prepared.groups)
    pruned.hf.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, pruned.hf(input_ids=ids()).logits)


def test_different_counts_per_layer_and_emptying_are_refused_in_one_line(folder):
    model = load(folder)
    with pytest.raises(ExplorerError, match="same number of key/value groups"):
        gqa.remove_groups(copy.deepcopy(model), {"hf.model.layers.0.self_attn": [0]})
    with pytest.raises(ExplorerError, match="every key/value group"):
        gqa.remove_groups(copy.deepcopy(model), {f"hf.model.layers.{i}.self_attn": [0, 1] for i in range(2)})
    with pytest.raises(ExplorerError, match="not a grouped-query attention"):
        gqa.remove_groups(copy.deepcopy(model), {"hf.model.layers.0.mlp": [0]})


def test_the_compatibility_report_names_the_key_value_constraint(folder):
    result = compat.report(load(folder), ids(), calib_batches=1, calib_batch_size=2)
    assert result["structures"]["head"]["ok"]
    assert any("4 query heads share 2 key/value heads" in line and "1/2 steps" in line for line in result["constraints"])
    assert not result["structures"]["channel"]["ok"] and "--structure head" in result["structures"]["channel"]["reason"]
    with pytest.raises(ExplorerError, match="^Channel pruning is not offered for LLaMA-style attention"):
        pipeline.prepare(load(folder), ScoringSpec("channel", "magnitude"), example_input=ids())


def test_the_prune_pages_group_card_counts_key_value_groups_not_channels(tmp_path):
    """The coupled-group card names its unit: key/value groups for LLaMA-style attention (with their real cost)."""
    from streamlit.testing.v1 import AppTest

    from tests.apptest import goto, set_sparsity, texts
    from tests.test_app_numbers import _untrained_entry
    from tests.test_app_transformers import load_transformer

    tokenizer = hf.tiny_tokenizer("gpt2")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    at = AppTest.from_file("../app.py", default_timeout=240)
    at.session_state["current_model"] = _untrained_entry("mlp")  # no baseline to train first
    load_transformer(at, "local Hugging Face folder", folder=str(tmp_path))
    assert not at.error, texts(at.error)
    goto(at, "app_pages/prune.py")
    at.radio(key="prune_structure").set_value("head").run()
    at.selectbox(key="prune_criterion").set_value("magnitude").run()
    at.radio(key="prune_scope").set_value("local").run()
    set_sparsity(at, 0.5)
    at.selectbox(key="prune_group_layer").set_value("hf.model.layers.0.self_attn").run()
    assert not at.error and not at.exception, texts(at.error)
    metrics = {m.label: m for m in at.metric}
    assert metrics["Key/value groups in group"].value == str(KV_HEADS)
    assert "1 removed" in metrics["Key/value groups in group"].delta
    # by hand: a key/value group is 2 query heads (16 rows of q_proj and 16 columns of o_proj each, 64 wide)
    # and 16 rows each of k_proj and v_proj
    assert metrics["Params per key/value group, real"].value == f"{2 * 2 * HEAD_DIM * HIDDEN + 2 * HEAD_DIM * HIDDEN:,}"
    assert not any("channel" in label.lower() for label in metrics)
    assert any("Removing 1 key/value group(s)" in c.value for c in at.caption)
