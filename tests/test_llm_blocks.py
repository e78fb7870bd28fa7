"""LLM pruning as the papers do it: only the transformer blocks' Linears, protect alike for every criterion."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from explorer import blocks, hf, pipeline, text  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.layers import effective_weight, effective_weights  # noqa: E402
from explorer.specs import PlanSpec, ScoringSpec  # noqa: E402

CRITERIA = ["magnitude", "wanda", "sparsegpt"]


def tiny_llama(tied: bool):
    """A two-block LLaMA-shaped causal LM with random weights, and the text tokenised for it."""
    tokenizer = hf.tiny_tokenizer("gpt2", vocab_size=300)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = hf.wrap_hf(transformers.LlamaForCausalLM(config), pad_id=tokenizer.pad_token_id, seq_len=32)
    return model, text.text_dataset(tokenizer, seq_len=32)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama(request):
    return tiny_llama(request.param)


def test_the_blocks_of_gpt2_llama_opt_and_bert_are_found_and_the_rest_is_outside(llama):
    model, _ = llama
    assert blocks.find_blocks(model)[0] == "hf.model.layers"
    assert blocks.outside_blocks(model) == ["hf.lm_head"]
    gpt2 = hf.builtin("tiny_gpt2").model
    assert blocks.find_blocks(gpt2)[0] == "hf.transformer.h" and blocks.outside_blocks(gpt2) == ["hf.lm_head"]
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                                             num_attention_heads=2, vocab_size=50,
                                                             word_embed_proj_dim=16))
    assert blocks.find_blocks(opt)[0] == "model.decoder.layers" and blocks.outside_blocks(opt) == ["lm_head"]
    bert = hf.builtin("tiny_bert").model
    assert blocks.outside_blocks(bert) == ["hf.bert.pooler.dense", "hf.classifier"]
    assert blocks.outside_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []  # no blocks: nothing outside
    assert not blocks.is_causal_lm(bert) and blocks.is_causal_lm(gpt2)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_lm_head_is_untouched_by_default_and_protect_works_for_every_criterion(llama, criterion):
    model, dataset = llama
    head = model.hf.lm_head.weight.detach().clone()
    protected = "hf.model.layers.0.mlp.up_proj"
    prepared = pipeline.prepare(model, ScoringSpec(criterion=criterion, calib_batches=1, calib_batch_size=8),
                                dataset=dataset)
    assert "hf.lm_head" not in prepared.names and prepared.kept_dense[0] == "hf.lm_head"
    assert "outside the transformer blocks" in prepared.note
    # protecting the head (tied or not) is accepted by every criterion, and a block layer is kept dense
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, protect=("hf.lm_head", protected)))
    pruned = pipeline.apply(model, prepared, plan)
    weights = effective_weights(pruned)
    assert torch.equal(effective_weight(pruned.hf.lm_head), head)
    assert torch.equal(weights[protected], model.get_submodule(protected).weight)
    others = [name for name in prepared.names if name != protected]
    assert all(float((weights[name] == 0).float().mean()) == pytest.approx(0.5, abs=0.02) for name in others)
    with pytest.raises(ExplorerError, match="not in this ranking"):  # a name that is no layer still fails
        pipeline.preview(prepared, PlanSpec(sparsity=0.5, protect=("hf.no_such_layer",)))


def test_include_head_prunes_an_untied_head_and_keeps_a_tied_one_dense_for_sparsegpt():
    for tied in (False, True):
        model, dataset = tiny_llama(tied)
        for criterion in CRITERIA:
            prepared = pipeline.prepare(model, ScoringSpec(criterion=criterion, calib_batches=1, calib_batch_size=8,
                                                           include_head=True), dataset=dataset)
            in_ranking = "hf.lm_head" in prepared.names
            assert in_ranking == (not tied or criterion != "sparsegpt"), (tied, criterion)
            assert ("tied" in prepared.note) == (tied and criterion == "sparsegpt")


def test_the_cli_keeps_lm_head_dense_unless_include_head(capsys):
    for extra, pruned_head in (([], False), (["--include-head"], True)):
        code = main(["prune", "--model", "tiny_gpt2", "--criterion", "wanda", "--sparsity", "0.5", "--calib-batches",
                     "1", "--plan-only", "--json", *extra])
        result = json.loads(capsys.readouterr().out)
        names = [layer["name"] for layer in result["layers"]]
        assert code == 0 and ("hf.lm_head" in names) == pruned_head
        assert result["recipe"]["scoring"]["include_head"] is pruned_head
    code = main(["prune", "--model", "tiny_gpt2", "--criterion", "sparsegpt", "--sparsity", "0.5", "--calib-batches",
                 "1", "--plan-only", "--json", "--protect", "hf.lm_head"])
    assert code == 0 and "hf.lm_head" not in json.loads(capsys.readouterr().out)["layers"]
