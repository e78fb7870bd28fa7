"""nn.MultiheadAttention as a first-class layer: masks, Wanda, N:M on its projections; heads removed and reloaded.

Checked against independent computations: PyTorch's own attention forward, a dense model with the
removed heads' output columns zeroed, a brute-force parameter count, and the input ``out_proj`` receives
computed by a copy whose ``out_proj`` is the identity.
"""
import copy

import pytest
import torch
from torch import nn

from explorer import llm, masking, measure, mha, pipeline, planner, structural, zoo
from explorer.errors import ExplorerError
from explorer.layers import effective_weight, fold_masks, prunable_layers
from explorer.models import load_model, save_model
from explorer.specs import PlanSpec, ScoringSpec

SHAPE, CLASSES = (3, 16, 16), 4


def vit():
    torch.manual_seed(0)
    return zoo.build("vit_small", SHAPE, CLASSES).eval()


def images(n=3, seed=1):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def calib():
    return [(images(4, seed), torch.tensor([0, 1, 2, 3])) for seed in (2, 3)]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("batch_first", [True, False])
def test_attend_then_out_proj_is_pytorchs_attention_with_masks_and_weights(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal},
                   {"attn_mask": causal, "key_padding_mask": padding, "average_attn_weights": False}):
        expected, expected_weights = attention(x, x, x, **kwargs)
        context, weights = mha.attend(attention, x, x, x, **kwargs)
        out = nn.functional.linear(context, attention.out_proj.weight, attention.out_proj.bias)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=1e-4)
        context, none = mha.attend(attention, x, x, x, need_weights=False, **kwargs)  # the fused kernel's path
        out = nn.functional.linear(context, attention.out_proj.weight, attention.out_proj.bias)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        assert none is None
    one = torch.randn(5, 16)  # unbatched
    out = nn.functional.linear(mha.attend(attention, one, one, one)[0], attention.out_proj.weight, attention.out_proj.bias)
    torch.testing.assert_close(out, attention(one, one, one)[0], atol=1e-5, rtol=1e-4)


def test_attention_input_projections_are_prunable_layers_of_the_vit():
    names = [name for name, _ in prunable_layers(vit())]
    assert "encoder.layers.0.self_attn" in names and "encoder.layers.0.self_attn.out_proj" in names


def test_unstructured_masks_cover_in_proj_and_out_proj_and_fine_tune_keeps_them():
    model = vit()
    prepared = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude"), example_input=images(1))
    masked = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local")))
    attention = masked.encoder.layers[0].self_attn
    assert float((effective_weight(attention) == 0).float().mean()) == pytest.approx(0.5, abs=1 / 192)
    # the attention never calls out_proj: its mask must still follow weight_orig through training steps
    masked.train()
    optimizer = torch.optim.SGD(masked.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        masked(images()).square().sum().backward()
        optimizer.step()
    masked.eval()
    with torch.no_grad():  # folding takes weight_orig x mask: equal outputs mean out_proj's weight was not stale
        torch.testing.assert_close(masked(images()), fold_masks(masked)(images()), atol=1e-5, rtol=1e-4)
    projection = attention.out_proj
    assert torch.equal(projection.weight, effective_weight(projection))
    assert bool((projection.weight[~projection.weight_mask.bool()] == 0).all())


def test_wanda_scores_out_proj_by_the_attention_output_it_really_receives():
    model = vit()
    raw = llm.wanda_raw(model, calib())
    name = "encoder.layers.1.self_attn.out_proj"
    assert "encoder.layers.1.self_attn" in raw and name in raw
    identity = copy.deepcopy(model)  # independent: with out_proj = I the attention returns its input to out_proj
    attention = identity.encoder.layers[1].self_attn
    with torch.no_grad():
        attention.out_proj.weight.copy_(torch.eye(64))
        attention.out_proj.bias.zero_()
    seen = []
    attention.register_forward_hook(lambda module, args, output: seen.append(output[0].reshape(-1, 64)))
    with torch.no_grad():
        for x, _ in calib():
            identity(x)
    norms = torch.cat(seen).double().pow(2).sum(0).sqrt().float()
    projection = model.encoder.layers[1].self_attn.out_proj.weight.detach()
    torch.testing.assert_close(raw[name], projection.abs() * norms, rtol=1e-4, atol=1e-6)


def test_two_four_on_the_vit_holds_in_every_attention_projection():
    model = vit()
    scores = llm.nm_scores(llm.wanda_scores(model, calib()), 2, 4)
    ranking = planner.prepare(scores)
    pruned = masking.apply(model, planner.plan(ranking, 0.5, "local"), ranking)
    violations = llm.check_nm(pruned, 2, 4)
    assert "encoder.layers.0.self_attn" in violations and set(violations.values()) == {0}


def test_head_plan_cost_per_head_equals_a_real_removal_and_equals_zeroed_heads():
    model = vit()
    prepared = pipeline.prepare(model, ScoringSpec("head", "magnitude"), example_input=images(1))
    groups = {group.name: group for group in prepared.groups if group.kind == mha.KIND}
    assert set(groups) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    for name, group in groups.items():
        info = prepared.attention[name]
        assert (info.heads, info.head_dim) == (4, 16)
        for heads_gone in ([2], [0, 3]):
            pruned = copy.deepcopy(model)
            mha.remove_heads(pruned, {name: heads_gone})
            channels = [h * 16 + c for h in heads_gone for c in range(16)]
            assert _params(model) - _params(pruned) == group.params_removed(channels)
            assert group.params_removed(channels) == len(channels) * group.params_per_channel_real
            zeroed = copy.deepcopy(model)  # independent: a head whose output columns are zero adds nothing
            with torch.no_grad():
                zeroed.get_submodule(name).out_proj.weight[:, channels] = 0
                torch.testing.assert_close(pruned(images()), zeroed(images()), atol=1e-5, rtol=1e-4)
    # 64 inputs: per head 3 x 16 rows of 64 weights + bias, and 16 out_proj columns of 64
    assert groups["encoder.layers.0.self_attn"].params_per_channel_real * 16 == 3 * 16 * 65 + 16 * 64


def test_head_pruned_vit_runs_saves_and_reloads_with_its_head_counts(tmp_path):
    model = vit()
    prepared = pipeline.prepare(model, ScoringSpec("head", "magnitude"), example_input=images(1))
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local"))
    pruned = pipeline.apply(model, prepared, plan)
    assert mha.head_counts(pruned) == {"encoder.layers.0.self_attn": 2, "encoder.layers.1.self_attn": 2}
    assert mha.head_counts(model) == {"encoder.layers.0.self_attn": 4, "encoder.layers.1.self_attn": 4}
    attention = pruned.encoder.layers[0].self_attn
    assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (2, 16, 64)
    assert attention.in_proj_weight.shape == (3 * 32, 64) and attention.out_proj.weight.shape == (64, 32)
    path = save_model(pruned, tmp_path / "vit_heads.pt", arch="vit_small", input_shape=SHAPE, num_classes=CLASSES)
    reloaded = load_model(str(path)).eval()
    assert mha.head_counts(reloaded) == mha.head_counts(pruned)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images()), pruned(images()))
    again = pipeline.prepare(reloaded, ScoringSpec("head", "magnitude"), example_input=images(1))
    assert {prepared.attention[n].heads for n in again.attention if n in prepared.attention} == {4}
    assert {again.attention[n].heads for n in again.attention} == {2}  # a pruned model prunes again by its own heads


def test_channel_structure_on_the_vit_leaves_the_residual_stream_out_and_says_why():
    model = vit()
    groups, skipped = structural.channel_groups_and_skipped(model, images(1))
    assert [g.name for g in groups] == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    residual = next(s for s in skipped if s["root"] == "patch_embed")
    assert "MultiheadAttention" in residual["reason"] and "encoder.layers.0.self_attn" in residual["layers"]


def test_heads_cannot_all_go_and_masked_or_unknown_attentions_are_refused_in_one_line():
    model = vit()
    with pytest.raises(ExplorerError, match="every head"):
        mha.remove_heads(copy.deepcopy(model), {"encoder.layers.0.self_attn": [0, 1, 2, 3]})
    with pytest.raises(ExplorerError, match="not an nn.MultiheadAttention"):
        mha.remove_heads(copy.deepcopy(model), {"encoder.layers.0.linear1": [0]})
    with pytest.raises(ExplorerError, match="4 heads"):
        mha.remove_heads(copy.deepcopy(model), {"encoder.layers.0.self_attn": [4]})
    masked = masking.apply_masks(model, {"encoder.layers.0.self_attn": torch.rand(192, 64) > 0.5})
    with pytest.raises(ExplorerError, match="masks"):
        mha.remove_heads(masked, {"encoder.layers.0.self_attn": [0]})
    with pytest.raises(ExplorerError, match="conductance.*no score to the heads"):
        pipeline.prepare(model, ScoringSpec("head", "conductance", calib_batches=1, calib_batch_size=4),
                         example_input=images(1), dataset=_Tiny())


def test_flops_of_an_attention_are_its_projections_split_between_in_proj_and_out_proj():
    flops = measure.flops(vit(), images(1))["per_layer"]
    tokens = (16 // 2) ** 2 + 1  # 2 x 2 patches of a 16 x 16 image, and the class token
    assert flops["encoder.layers.0.self_attn"]["dense"] == 2 * tokens * 64 * 192  # 2 FLOPs a multiply-add
    assert flops["encoder.layers.0.self_attn.out_proj"]["dense"] == 2 * tokens * 64 * 64
    odd = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert mha.unsupported(odd) and mha.head_groups(nn.Sequential(odd)) == ([], {})


class _Tiny:
    """The calibration a dataset gives: two labelled batches of random images."""

    def calibration(self, batches, batch_size, seed=0):
        return calib()[:batches]
