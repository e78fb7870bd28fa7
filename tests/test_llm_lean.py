"""The lean path (`explorer.lean`) prunes in place, layer by layer, with the general path's masks and weights."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from explorer import hf, lean, masking, pipeline  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.layers import effective_weight  # noqa: E402
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec  # noqa: E402

CALIB = dict(calib_samples=4, calib_seqlen=32, calib_mode="windows")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tokenizer = hf.tiny_tokenizer("gpt2")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                                      pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"gpt2": pipeline.resolve_model(ModelSpec("tiny_gpt2", data="text"))[:2],
            "llama": pipeline.resolve_model(ModelSpec(f"hf:{folder}", data="text"))[:2]}


CASES = [("magnitude", "unstructured", False), ("magnitude", "nm", False), ("wanda", "unstructured", False),
         ("wanda", "nm", False), ("wanda", "unstructured", True), ("sparsegpt", "unstructured", False),
         ("sparsegpt", "nm", False), ("sparsegpt", "unstructured", True)]


@pytest.mark.parametrize("kind, criterion, structure, sequential",
                         [("gpt2", *case) for case in CASES] + [("llama", *CASES[i]) for i in (0, 2, 4, 5, 6)])
def test_lean_masks_and_weights_equal_the_general_path(models, kind, criterion, structure, sequential):
    model, dataset = models[kind]
    scoring = ScoringSpec(criterion=criterion, structure=structure, sequential=sequential,
                          **(CALIB if criterion != "magnitude" else {}))
    plan_spec = PlanSpec(sparsity=0.5 if structure == "nm" else 0.6)
    assert lean.refusal(model, scoring, plan_spec) is None
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    general = pipeline.prepare(model, scoring, dataset=dataset)
    expected = pipeline.apply(model, general, pipeline.preview(general, plan_spec))
    prepared = pipeline.prepare(model, scoring, dataset=dataset, lean=True)
    plan = pipeline.preview(prepared, plan_spec)
    assert [(lp.name, lp.pruned) for lp in plan.layers] == \
        [(lp.name, lp.pruned) for lp in pipeline.preview(general, plan_spec).layers]
    assert prepared.scores == {} and prepared.kept_dense == general.kept_dense
    seen = []
    pruned = pipeline.apply(model, prepared, plan, progress=lambda fraction, text: seen.append(fraction))
    assert seen and seen[-1] == 1.0
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())  # a copy was pruned
    assert not masking.current_masks(pruned)  # plain zeros, no re-parametrisation
    masks = masking.current_masks(expected)
    assert set(masks) == {lp.name for lp in plan.layers if lp.pruned}
    for name, mask in masks.items():
        weight = effective_weight(pruned.get_submodule(name))
        assert torch.equal(weight != 0, mask), name
        if criterion == "sparsegpt":  # rebuilt weights: the same arithmetic, in another order of blocks
            assert torch.allclose(weight, effective_weight(expected.get_submodule(name)), atol=1e-6), name
        else:
            assert torch.equal(weight, effective_weight(expected.get_submodule(name))), name
    assert torch.equal(pruned.hf.lm_head.weight, model.hf.lm_head.weight)  # kept dense, as the papers do


def test_in_place_prunes_the_model_itself_and_global_scope_or_a_head_is_refused(models):
    model, dataset = models["gpt2"]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prepared = pipeline.prepare(model, ScoringSpec(criterion="magnitude"), dataset=dataset, lean=True)
    wanda = pipeline.prepare(model, ScoringSpec(criterion="wanda", **CALIB), dataset=dataset, lean=True)
    with pytest.raises(ExplorerError, match="local scope"):
        pipeline.preview(wanda, PlanSpec(sparsity=0.5, scope="global"))
    with pytest.raises(ExplorerError, match="thresholds"):
        pipeline.thresholds(wanda, pipeline.preview(wanda, PlanSpec(sparsity=0.5)))  # magnitude's: test_app_lean
    try:
        pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5)), in_place=True)
        assert pruned is model and float((model.hf.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == 0.5
    finally:
        model.load_state_dict(state)
    assert "global" in lean.refusal(model, ScoringSpec(criterion="wanda"), PlanSpec(sparsity=0.5, scope="global"))
    assert "head" in lean.refusal(model, ScoringSpec(include_head=True))
    assert "criterion" in lean.refusal(model, ScoringSpec(criterion="random"))
    assert "structure" in lean.refusal(model, ScoringSpec(structure="channel"))
    with pytest.raises(ExplorerError, match="lean path cannot"):
        pipeline.prepare(model, ScoringSpec(criterion="random"), dataset=dataset, lean=True)
    masked = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5)))
    masked = masking.apply_masks(masked, {"hf.transformer.h.0.mlp.c_fc": masked.hf.transformer.h[0].mlp.c_fc.weight != 0})
    assert "masks" in lean.refusal(masked, ScoringSpec())
    with pytest.raises(ExplorerError, match="carries a mask"):
        masking.zero_pruned(masked, {"hf.transformer.h.0.mlp.c_fc": torch.ones_like(masked.hf.transformer.h[0].mlp.c_fc.weight_orig, dtype=torch.bool)})


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.999])
def test_a_global_magnitude_plan_from_thresholds_equals_the_ranked_plan_ties_included(models, sparsity):
    model, dataset = models["llama"]
    coarse = pipeline.clone_model(model)
    with torch.no_grad():  # coarse weights: many ties at the threshold, across layers and within them
        for name, parameter in coarse.named_parameters():
            if ".layers." in name:
                parameter.copy_((parameter * 50).round() / 50)
    scoring, spec = ScoringSpec(criterion="magnitude"), PlanSpec(sparsity=sparsity, scope="global")
    assert lean.refusal(coarse, scoring, spec) is None
    general = pipeline.prepare(coarse, scoring, dataset=dataset)
    expected_plan = pipeline.preview(general, spec)
    prepared = pipeline.prepare(coarse, scoring, dataset=dataset, lean=True)
    plan = pipeline.preview(prepared, spec)
    assert [(lp.name, lp.pruned) for lp in plan.layers] == [(lp.name, lp.pruned) for lp in expected_plan.layers]
    assert (plan.collapse_point, plan.collapse_layer) == (expected_plan.collapse_point, expected_plan.collapse_layer)
    assert plan.pruned == expected_plan.pruned and plan.collapsed == expected_plan.collapsed
    if not plan.collapsed:  # the masks `lean.prune` writes (zeros among the weights: compare the masks)
        for name, mask in masking.current_masks(pipeline.apply(coarse, general, expected_plan)).items():
            assert torch.equal(lean.magnitude_mask(coarse.get_submodule(name), plan.layer(name).pruned), mask), name
    with pytest.raises(ExplorerError, match="min_keep"):
        pipeline.preview(prepared, PlanSpec(sparsity=sparsity, scope="global", min_keep=0.1))
    assert "min_keep" in lean.refusal(coarse, scoring, PlanSpec(sparsity=0.5, scope="global", min_keep=0.1))


@pytest.mark.parametrize("count", [0, 1, 37, 64, 127, 128])
def test_magnitude_mask_prunes_what_a_stable_sort_of_the_layer_prunes(count):
    layer = torch.nn.Linear(16, 8)
    torch.manual_seed(count)
    with torch.no_grad():  # |w| in {0, 1, 2, 3}: ties everywhere, across rows too
        layer.weight.copy_(torch.randint(-3, 4, (8, 16)).float())
    expected = torch.ones(128, dtype=torch.bool)
    expected[torch.argsort(layer.weight.detach().abs().reshape(-1), stable=True)[:count]] = False
    keep = lean.magnitude_mask(layer, count)
    assert keep.shape == layer.weight.shape and int((~keep).sum()) == count
    assert torch.equal(keep.reshape(-1), expected)


def test_a_first_global_question_answered_alone_equals_the_slider_grids_answer(models):
    model, _ = models["llama"]
    coarse = pipeline.clone_model(model)
    with torch.no_grad():  # ties at the thresholds
        for name, parameter in coarse.named_parameters():
            if ".layers." in name:
                parameter.copy_((parameter * 50).round() / 50)
    modules = {name: module for name, module in coarse.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    names, total = list(modules), sum(m.weight.numel() for m in modules.values())
    for fraction in (0.1, 0.37, 0.5, 0.93):
        target = round(fraction * total)
        alone = lean.MagnitudeOrder(modules)
        answer = alone.counts(names, target)  # the first question: one target's passes
        assert alone._answers.keys() == {(tuple(names), target)}
        grid = lean.MagnitudeOrder(modules)
        grid.counts(names, 1)
        assert grid.counts(names, target) == answer and len(grid._answers) > 100  # the second: the whole grid
        assert sum(answer.values()) == target
