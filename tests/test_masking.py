"""Masks from a plan: exactly the planned zeros, on a copy, fine-tunable, made permanent."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explorer.criteria import channel_scores, weight_scores
from explorer.errors import ExplorerError
from explorer.layers import fold_masks, is_masked
from explorer.masking import apply, masks, sparsity_report
from explorer.planner import plan, prepare, pruned_indices


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


@pytest.fixture
def pruned_setup():
    model = small_model()
    ranking = prepare(weight_scores(model, "magnitude"))
    result = plan(ranking, 0.6, "global", protect=["7"])
    return model, ranking, result


def test_masks_prune_the_lowest_magnitudes(pruned_setup):
    model, ranking, result = pruned_setup
    layer_masks = masks(ranking, result)
    for name, module in model.named_children():
        if name not in layer_masks:
            continue
        keep = layer_masks[name]
        assert keep.dtype == torch.bool and keep.shape == module.weight.shape
        assert int((~keep).sum()) == result.layer(name).pruned
        magnitudes = module.weight.detach().abs()
        if (~keep).any() and keep.any():
            assert magnitudes[~keep].max() <= magnitudes[keep].min()
    threshold = torch.cat([m.weight.detach().abs().flatten() for m in (model[0], model[3])]).sort().values
    assert result.pruned == round(0.6 * threshold.numel())


def test_apply_gives_exact_zeros_on_a_copy(pruned_setup):
    model, ranking, result = pruned_setup
    before = copy.deepcopy(model.state_dict())
    pruned = apply(model, result, ranking)
    assert is_masked(pruned) and not is_masked(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    report = sparsity_report(pruned)
    expected_masks = masks(ranking, result)
    for layer in result.layers:
        assert report[layer.name] == (layer.pruned, layer.total)
        module = dict(pruned.named_modules())[layer.name]
        assert torch.equal(module.weight_mask.bool(), expected_masks[layer.name])
        assert torch.equal(module.weight_orig, before[f"{layer.name}.weight"])


def test_masked_copy_trains_with_masks_enforced(pruned_setup):
    model, ranking, result = pruned_setup
    pruned = apply(model, result, ranking)
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.5)
    inputs, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(pruned(inputs), labels).backward()
        optimizer.step()
    pruned(inputs)
    report = sparsity_report(pruned)
    for layer in result.layers:
        assert report[layer.name][0] >= layer.pruned


def test_fold_masks_removes_reparametrisation(pruned_setup):
    model, ranking, result = pruned_setup
    pruned = apply(model, result, ranking)
    permanent = fold_masks(pruned)
    assert is_masked(pruned) and not is_masked(permanent)
    for name, module in permanent.named_modules():
        assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
    assert sparsity_report(permanent) == sparsity_report(pruned)
    inputs = torch.randn(2, 3, 8, 8)
    pruned.eval(), permanent.eval()
    assert torch.allclose(pruned(inputs), permanent(inputs))
    assert all("orig" not in key and "mask" not in key for key in permanent.state_dict())


def test_repeated_masking_combines_masks():
    model = small_model()
    ranking = prepare(weight_scores(model, "magnitude"))
    once = apply(model, plan(ranking, 0.3, "local"), ranking)
    twice = apply(once, plan(ranking, 0.5, "local"), ranking)
    report = sparsity_report(fold_masks(twice))
    assert report["0"][0] == round(0.5 * 162)


def test_channel_plan_is_rejected():
    model = small_model()
    ranking = prepare(channel_scores(model, "magnitude"))
    with pytest.raises(ExplorerError, match="structural"):
        apply(model, plan(ranking, 0.5, "local"), ranking)


def test_plan_for_another_model_is_rejected():
    model = small_model()
    ranking = prepare({"missing": torch.rand(3)})
    with pytest.raises(ExplorerError, match="missing"):
        apply(model, plan(ranking, 0.5, "local"), ranking)


def test_nm_masks_keep_the_best_two_of_every_four():
    from explorer.masking import apply_masks, nm_masks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Linear(8, 3))
    scores = weight_scores(model, "magnitude")
    scores.pop("0")  # 27 weights per filter: not a multiple of 4
    layer_masks = nm_masks(scores, 2, 4)
    for name, keep in layer_masks.items():
        groups = scores[name].reshape(scores[name].shape[0], -1, 4)
        kept = keep.reshape(groups.shape)
        assert (kept.sum(-1) == 2).all()
        lowest_kept = torch.where(kept, groups, torch.inf).min(-1).values
        highest_dropped = torch.where(kept, -torch.inf, groups).max(-1).values
        assert (lowest_kept >= highest_dropped).all()
    pruned = apply_masks(model, layer_masks)
    report = sparsity_report(pruned)
    assert report == {"0": (0, 216), "1": (16, 32), "2": (12, 24)}
    with pytest.raises(ExplorerError, match="multiple of 4"):
        nm_masks(weight_scores(model, "magnitude"), 2, 4)
    with pytest.raises(ExplorerError):
        nm_masks(scores, 5, 4)


# --- Masks in place on the model being trained, with regrowth. ---

def linear_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def random_mask(shape, seed, keep=0.5):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep


def test_current_masks_lists_only_masked_layers_as_copies(pruned_setup):
    from explorer.masking import current_masks

    model, ranking, result = pruned_setup
    assert current_masks(model) == {}
    pruned = apply(model, result, ranking)
    got, expected = current_masks(pruned), masks(ranking, result)
    assert set(got) == {"0", "3", "7"}
    assert all(got[name].dtype == torch.bool and torch.equal(got[name], expected[name]) for name in got)
    got["0"].fill_(False)
    assert bool(pruned[0].weight_mask.any())


def test_set_masks_installs_in_place_and_keeps_the_parameter():
    from explorer.layers import effective_weight
    from explorer.masking import set_masks

    model = linear_model()
    weight, other = model[0].weight, model[2].weight
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    keep = random_mask((5, 6), seed=0)
    regrown = set_masks(model, {"0": keep, "2": torch.ones(3, 5, dtype=torch.bool)})
    assert model[0].weight_orig is weight and not hasattr(model[2], "weight_mask") and model[2].weight is other
    assert not regrown["0"].any() and not regrown["2"].any()
    effective = effective_weight(model[0]).detach()
    for index in range(keep.numel()):
        row, column = divmod(index, 6)
        expected = before[row, column] if keep[row, column] else 0.0
        assert effective[row, column] == expected
    inputs, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):  # the optimizer built before masking still trains the same Parameter
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    assert not torch.equal(model[0].weight_orig.detach(), before)
    assert sparsity_report(model)["0"][0] >= int((~keep).sum())
    assert torch.equal(effective_weight(model[0]).detach()[~keep], torch.zeros(int((~keep).sum())))


@pytest.mark.parametrize("regrow", ["zero", "keep", "init"])
def test_set_masks_updates_the_buffer_in_place_and_regrows(regrow):
    from explorer.layers import effective_weight
    from explorer.masking import set_masks

    model = linear_model()
    init = {"0": torch.randn(5, 6), "2": torch.randn(3, 5)}
    old, new = random_mask((5, 6), seed=1), random_mask((5, 6), seed=2)
    set_masks(model, {"0": old})
    with torch.no_grad():
        model[0].weight_orig.add_(1.0)  # training moved every weight, pruned ones included
    orig, buffer = model[0].weight_orig, model[0].weight_mask
    held = orig.detach().clone()
    parameters = [id(p) for p in model.parameters()]
    regrown = set_masks(model, {"0": new}, regrow=init if regrow == "init" else regrow)
    assert model[0].weight_orig is orig and model[0].weight_mask is buffer
    assert [id(p) for p in model.parameters()] == parameters
    expected_regrown = torch.tensor([not o and n for o, n in zip(old.flatten().tolist(), new.flatten().tolist())])
    assert torch.equal(regrown["0"].flatten(), expected_regrown) and expected_regrown.any()
    start = {"zero": torch.zeros(5, 6), "keep": held, "init": init["0"]}[regrow]
    expected_orig = torch.where(expected_regrown.reshape(5, 6), start, held)
    assert torch.equal(orig.detach(), expected_orig)
    assert torch.equal(effective_weight(model[0]).detach(), torch.where(new, expected_orig, torch.zeros(5, 6)))
    assert torch.equal(model[0].weight.detach(), effective_weight(model[0]).detach())
    assert (model[0].weight[~new] == 0).all()


def test_set_masks_round_trip_changes_nothing(pruned_setup):
    from explorer.masking import current_masks, set_masks

    model, ranking, result = pruned_setup
    pruned = apply(model, result, ranking)
    state = copy.deepcopy(pruned.state_dict())
    set_masks(pruned, current_masks(pruned))
    assert all(torch.equal(value, state[key]) for key, value in pruned.state_dict().items())
    assert list(pruned.state_dict()) == list(state)


def test_set_masks_errors_change_nothing():
    from explorer.masking import set_masks

    model = linear_model()
    set_masks(model, {"0": random_mask((5, 6), seed=3)})
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ExplorerError, match=r"'2'.*\(3, 5\)"):
        set_masks(model, {"0": torch.ones(5, 6, dtype=torch.bool), "2": torch.ones(5, 3, dtype=torch.bool)})
    with pytest.raises(ExplorerError, match="'fc'.*0, 2"):
        set_masks(model, {"fc": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ExplorerError, match=r"'0'.*\(5, 6\)"):
        set_masks(model, {"0": torch.ones(5, 6, dtype=torch.bool)}, regrow={"2": torch.zeros(3, 5)})
    with pytest.raises(ExplorerError, match="regrow"):
        set_masks(model, {"0": torch.ones(5, 6, dtype=torch.bool)}, regrow="random")
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_masked_copy_functions_see_in_place_masks():
    from explorer.masking import apply_masks, current_masks, set_masks

    model = linear_model()
    first, second = random_mask((5, 6), seed=4), random_mask((5, 6), seed=5)
    set_masks(model, {"0": first})
    combined = apply_masks(model, {"0": second})
    assert torch.equal(current_masks(combined)["0"], first & second)
    assert torch.equal(current_masks(model)["0"], first)
    assert sparsity_report(fold_masks(model))["0"] == (int((~first).sum()), 30)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_iterative_pruning_in_place_with_random_scores(scope):
    """Two rounds on the model itself, random criterion: exact 75 % and round 1's pruned set kept."""
    from explorer.masking import current_masks, kept_units, set_masks

    model = small_model()
    sizes = {name: module.weight.numel() for name, module in model.named_children() if hasattr(module, "weight")
             and module.weight.dim() > 1}
    pruned_sets = []
    for seed, sparsity in ((0, 0.5), (1, 0.75)):
        scores = weight_scores(model, "random", seed=seed)
        ranking = prepare(scores, kept=kept_units(current_masks(model), scores))
        set_masks(model, masks(ranking, plan(ranking, sparsity, scope)))
        report = sparsity_report(model)
        if scope == "global":
            assert sum(report[name][0] for name in sizes) == round(sparsity * sum(sizes.values()))
        else:
            assert all(report[name][0] == round(sparsity * size) for name, size in sizes.items())
        pruned_sets.append({name: set(torch.nonzero(~mask.flatten()).flatten().tolist())
                            for name, mask in current_masks(model).items()})
    assert all(pruned_sets[0][name] <= pruned_sets[1][name] for name in pruned_sets[0])


def test_kept_units_turns_weight_masks_into_channel_masks():
    from explorer.masking import kept_units

    model = small_model()
    scores = channel_scores(model, "magnitude")
    weight_mask = torch.ones(6, 3, 3, 3, dtype=torch.bool)
    weight_mask[[1, 4]] = False
    weight_mask[2, 0, 0, 0] = False  # one weight pruned: the channel still lives
    channel_mask = torch.tensor([True, False, True, False])
    kept = kept_units({"0": weight_mask, "3": channel_mask, "not_scored": torch.ones(2)}, scores)
    assert set(kept) == {"0", "3"}
    assert kept["0"].tolist() == [True, False, True, True, False, True]
    assert torch.equal(kept["3"], channel_mask)
    ranking = prepare(scores, kept=kept)
    result = plan(ranking, 0.0, "local")
    assert set(pruned_indices(ranking, result, "0").tolist()) == {1, 4}
    assert set(pruned_indices(ranking, result, "3").tolist()) == {1, 3}
    with pytest.raises(ExplorerError, match=r"'3'.*\(4,\)"):
        kept_units({"3": torch.ones(3, dtype=torch.bool)}, scores)


def test_sparsity_counts_the_mask_so_a_weight_grown_back_at_zero_is_live():
    """The one definition of sparsity (issue 20): masked models count their masks, plain ones their zeros."""
    from explorer.data import load_dataset
    from explorer.layers import prunable_counts, prunable_layers
    from explorer.masking import set_masks
    from explorer.pipeline import measure_run
    from explorer.specs import MeasureSpec
    from explorer.zoo import build

    data = load_dataset("digits")
    torch.manual_seed(0)
    base = build("mlp", data.input_shape, data.num_classes)
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    layer_masks = {name: torch.rand(module.weight.shape, generator=generator) < 0.3
                   for name, module in prunable_layers(model)}
    set_masks(model, layer_masks)
    set_masks(model, {name: mask | (torch.rand(mask.shape, generator=generator) < 0.05)
                      for name, mask in layer_masks.items()}, regrow="zero")  # SET / RigL: new connections at 0
    regrown_at_zero = sum(int(((module.weight_orig * module.weight_mask) == 0).sum() - (module.weight_mask == 0).sum())
                          for _, module in prunable_layers(model))
    assert regrown_at_zero > 100  # the case the old count (zeros) got wrong
    live = sum(int(module.weight_mask.sum()) for _, module in prunable_layers(model))  # brute force over the masks
    total = sum(module.weight_mask.numel() for _, module in prunable_layers(model))
    assert prunable_counts(model) == (live, total)
    folded = fold_masks(model)  # no masks left: a live weight is a non-zero one
    assert prunable_counts(folded) == (sum(int((m.weight != 0).sum()) for _, m in prunable_layers(folded)), total)
    metrics = measure_run(base, model, data, MeasureSpec(latency=False))
    assert metrics["sparsity_actual"] == pytest.approx(1 - live / total)
    assert "sparsity_params" not in metrics  # the second figure is named for what it counts
    zeros = sum(int((p == 0).sum()) for p in folded.parameters())
    assert metrics["zero_fraction_all_params"] == pytest.approx(zeros / sum(p.numel() for p in base.parameters()))
