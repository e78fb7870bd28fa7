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
from explorer.planner import plan, prepare


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
