"""Planner results checked against an independent sort-and-count written here."""
import json
import math

import pytest
import torch
from torch import nn

from explorer.criteria import weight_scores
from explorer.errors import ExplorerError
from explorer.planner import Plan, plan, prepare, pruned_indices


def random_scores(seed=0, sizes=(30, 7, 120, 1, 55), ties=False):
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for index, size in enumerate(sizes):
        if ties:
            scores[f"layer{index}"] = torch.randint(0, 4, (size,), generator=generator).float()
        else:
            scores[f"layer{index}"] = torch.rand(size, generator=generator) * (index + 1)
    scores["conv"] = torch.rand(4, 3, 2, 2, generator=generator)
    return scores


def reference(scores, sparsity, scope, overrides=None, protect=(), min_keep=0.0):
    """Brute force: the set of pruned (layer, flat index) units, one unit at a time."""
    overrides = dict(overrides or {})
    overrides.update({name: 0.0 for name in protect})
    pruned = {name: set() for name in scores}
    flat = {name: tensor.reshape(-1).tolist() for name, tensor in scores.items()}
    names = list(scores)
    for name, value in overrides.items():
        order = sorted(range(len(flat[name])), key=lambda i: (flat[name][i], i))
        pruned[name] = set(order[: round(value * len(order))])
    pool = [name for name in names if name not in overrides]
    floor = {name: math.ceil(min_keep * len(flat[name]) - 1e-9) for name in pool}
    if scope == "local":
        for name in pool:
            order = sorted(range(len(flat[name])), key=lambda i: (flat[name][i], i))
            pruned[name] = set(order[: min(round(sparsity * len(order)), len(order) - floor[name])])
        return pruned
    units = sorted(
        (flat[name][i], names.index(name), i) for name in pool for i in range(len(flat[name]))
    )
    target = round(sparsity * len(units))
    count = 0
    for _, layer, i in units:
        if count == target:
            break
        name = names[layer]
        if len(pruned[name]) < len(flat[name]) - floor[name]:
            pruned[name].add(i)
            count += 1
    return pruned


def assert_matches(ranking, result, expected):
    for layer in result.layers:
        got = set(pruned_indices(ranking, result, layer.name).tolist())
        assert got == expected[layer.name], layer.name
        assert layer.pruned == len(expected[layer.name])
        assert layer.kept + layer.pruned == layer.total
        assert layer.collapsed == (layer.kept == 0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.77, 0.95, 1.0])
def test_plan_matches_brute_force(ties, scope, sparsity):
    scores = random_scores(seed=3, ties=ties)
    ranking = prepare(scores)
    result = plan(ranking, sparsity, scope)
    assert_matches(ranking, result, reference(scores, sparsity, scope))
    total = sum(t.numel() for t in scores.values())
    assert result.total == total
    if scope == "global":
        assert result.pruned == round(sparsity * total)
    else:
        for layer in result.layers:
            assert layer.pruned == round(sparsity * layer.total)
    assert result.sparsity_actual == pytest.approx(result.pruned / total)


def test_prepare_does_not_modify_scores_and_ties_follow_layer_order():
    scores = {"a": torch.zeros(3), "b": torch.zeros(3)}
    before = {name: tensor.clone() for name, tensor in scores.items()}
    ranking = prepare(scores)
    result = plan(ranking, 0.5, "global")
    assert [layer.pruned for layer in result.layers] == [3, 0]
    assert pruned_indices(ranking, result, "a").tolist() == [0, 1, 2]
    assert all(torch.equal(scores[name], before[name]) for name in scores)


def test_negative_zero_ties_with_zero():
    ranking = prepare({"a": torch.tensor([0.0, -0.0, -1.0, 1.0])})
    result = plan(ranking, 0.75, "global")
    assert pruned_indices(ranking, result, "a").tolist() == [2, 0, 1]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_overrides_and_protect(scope):
    scores = random_scores(seed=5)
    ranking = prepare(scores)
    overrides = {"layer2": 0.9, "conv": 0.25}
    result = plan(ranking, 0.6, scope, overrides=overrides, protect=["layer0"])
    assert_matches(ranking, result, reference(scores, 0.6, scope, overrides, ["layer0"]))
    assert result.layer("layer0").pruned == 0 and result.layer("layer0").source == "protected"
    assert result.layer("layer2").pruned == round(0.9 * 120) and result.layer("layer2").source == "override"
    if scope == "global":
        pool = [layer for layer in result.layers if layer.source == "global"]
        assert sum(layer.pruned for layer in pool) == round(0.6 * sum(layer.total for layer in pool))


def test_everything_protected_leaves_an_empty_pool():
    scores = random_scores()
    result = plan(prepare(scores), 0.5, "global", protect=list(scores))
    assert result.pruned == 0 and result.collapse_point is None


def test_protect_wins_over_override():
    ranking = prepare(random_scores())
    result = plan(ranking, 0.5, "global", overrides={"layer0": 0.8}, protect=["layer0"])
    assert result.layer("layer0").pruned == 0


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.85])
def test_min_keep_keeps_floor_and_meets_target(sparsity):
    scores = random_scores(seed=7)
    scores["layer1"] = scores["layer1"] * 1e-6  # would collapse first
    ranking = prepare(scores)
    result = plan(ranking, sparsity, "global", min_keep=0.1)
    assert_matches(ranking, result, reference(scores, sparsity, "global", min_keep=0.1))
    for layer in result.layers:
        assert layer.kept >= math.ceil(0.1 * layer.total)
    assert result.pruned == round(sparsity * result.total)
    assert result.target_met and not result.collapsed and result.collapse_point is None


def test_min_keep_reports_unreachable_target():
    scores = random_scores(seed=8)
    ranking = prepare(scores)
    result = plan(ranking, 1.0, "global", min_keep=0.2)
    floors = sum(math.ceil(0.2 * t.numel()) for t in scores.values())
    assert not result.target_met and "min_keep" in result.note
    assert result.pruned == result.total - floors
    assert_matches(ranking, result, reference(scores, 1.0, "global", min_keep=0.2))


def test_min_keep_in_local_scope():
    ranking = prepare(random_scores())
    result = plan(ranking, 1.0, "local", min_keep=0.5)
    for layer in result.layers:
        assert layer.kept == math.ceil(0.5 * layer.total)
    assert not result.target_met


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collapse_point_matches_brute_force(seed):
    scores = random_scores(seed=seed, sizes=(5, 9, 3, 12))
    scores["layer2"] = scores["layer2"] * 0.2
    total = sum(t.numel() for t in scores.values())
    first_k, first_layer = None, None
    for k in range(1, total + 1):
        pruned = reference(scores, k / total, "global")
        empty = [name for name in scores if len(pruned[name]) == scores[name].numel()]
        if empty:
            first_k, first_layer = k, empty[0]
            break
    result = plan(prepare(scores), 0.1, "global")
    assert result.collapse_point == pytest.approx(first_k / total)
    assert result.collapse_layer == first_layer
    ranking = prepare(scores)
    assert first_layer in plan(ranking, result.collapse_point, "global").collapsed
    assert not plan(ranking, (first_k - 1) / total, "global").collapsed


def test_collapse_point_with_protected_pool():
    scores = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.9, 1.0]), "c": torch.tensor([0.05])}
    result = plan(prepare(scores), 0.0, "global", protect=["c"])
    assert result.collapse_point == pytest.approx(2 / 5) and result.collapse_layer == "a"


def test_local_collapse_point_bound():
    scores = {"a": torch.rand(4), "b": torch.rand(10)}
    result = plan(prepare(scores), 0.2, "local")
    assert result.collapse_point == pytest.approx(1 - 0.5 / 4) and result.collapse_layer == "a"
    assert plan(prepare(scores), 0.85, "local").collapsed == []


def test_tiny_layer_collapses_globally_not_locally():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    ranking = prepare(weight_scores(model, "magnitude"))
    global_plan = plan(ranking, 0.6, "global")
    assert global_plan.collapsed == ["2"]
    assert global_plan.collapse_layer == "2"
    assert global_plan.collapse_point == pytest.approx(400 / 700)
    assert plan(ranking, 0.6, "local").collapsed == []


def test_sparsity_one_collapses_everything():
    ranking = prepare(random_scores())
    for scope in ("local", "global"):
        result = plan(ranking, 1.0, scope)
        assert result.collapsed == list(ranking.names) and result.sparsity_actual == 1.0


def test_plan_is_json_serialisable_and_round_trips():
    result = plan(prepare(random_scores()), 0.4, "global", overrides={"layer0": 0.5}, protect=["conv"])
    data = json.loads(json.dumps(result.to_dict()))
    assert Plan.from_dict(data) == result


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), "0.5", None, True])
def test_bad_sparsity(bad):
    with pytest.raises(ExplorerError):
        plan(prepare(random_scores()), bad, "global")


def test_bad_arguments():
    ranking = prepare(random_scores())
    with pytest.raises(ExplorerError, match="scope"):
        plan(ranking, 0.5, "layerwise")
    with pytest.raises(ExplorerError, match="nope"):
        plan(ranking, 0.5, "global", overrides={"nope": 0.5})
    with pytest.raises(ExplorerError, match="nope"):
        plan(ranking, 0.5, "global", protect=["nope"])
    with pytest.raises(ExplorerError):
        plan(ranking, 0.5, "global", overrides={"layer0": 2.0})
    with pytest.raises(ExplorerError):
        plan(ranking, 0.5, "global", min_keep=-1)
    with pytest.raises(ExplorerError, match="NaN"):
        prepare({"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ExplorerError, match="NaN"):
        prepare({"a": torch.tensor([1.0, float("inf")])})
    with pytest.raises(ExplorerError):
        prepare({})
    with pytest.raises(ExplorerError):
        pruned_indices(ranking, plan(prepare({"x": torch.rand(3)}), 0.5), "x")


@pytest.mark.parametrize("options", [{}, {"min_keep": 0.3}, {"protect": ["b"], "overrides": {"c": 0.5}}])
@pytest.mark.parametrize("sparsity", [0.013, 0.5, 0.8, 0.97])
def test_large_ranking_matches_brute_force(options, sparsity):
    """Enough units (~80 k, more than the grid's cuts) that a global plan refines a bracket."""
    generator = torch.Generator().manual_seed(11)
    scores = {
        "a": torch.randint(0, 50, (40_000,), generator=generator).float(),
        "b": torch.rand(300, 40, generator=generator),
        "c": torch.randn(20_000, generator=generator),
        "d": torch.rand(9_000, generator=generator) * 0.01,
        "e": torch.randint(0, 3, (77,), generator=generator).float() - 1,
    }
    ranking = prepare(scores)
    result = plan(ranking, sparsity, "global", **options)
    expected = reference(scores, sparsity, "global", options.get("overrides"), options.get("protect", ()),
                         options.get("min_keep", 0.0))
    assert_matches(ranking, result, expected)


# --- Planning on top of a current mask: already-pruned units score -inf and stay pruned. ---

def reference_with_mask(scores, kept, sparsity, scope, overrides=None, protect=(), min_keep=0.0):
    """Brute force with a current mask: dead units score -inf, every rule prunes at least them.

    Sorts (score or -inf, layer order, flat index) tuples and counts, one unit at a time.
    """
    overrides = dict(overrides or {})
    overrides.update({name: 0.0 for name in protect})
    names = list(scores)
    flat = {}
    for name, tensor in scores.items():
        live = kept[name].reshape(-1).tolist() if name in kept else [True] * tensor.numel()
        flat[name] = [value if alive else -math.inf for value, alive in zip(tensor.reshape(-1).tolist(), live)]
    dead = {name: sum(value == -math.inf for value in flat[name]) for name in names}
    pruned = {name: set() for name in names}

    def lowest(name, count):
        order = sorted(range(len(flat[name])), key=lambda i: (flat[name][i], i))
        return set(order[:count])

    for name, value in overrides.items():
        pruned[name] = lowest(name, max(dead[name], round(value * len(flat[name]))))
    pool = [name for name in names if name not in overrides]
    floor = {name: math.ceil(min_keep * len(flat[name]) - 1e-9) for name in pool}
    if scope == "local":
        for name in pool:
            wanted = min(round(sparsity * len(flat[name])), len(flat[name]) - floor[name])
            pruned[name] = lowest(name, max(dead[name], wanted))
        return pruned
    units = sorted((flat[name][i], names.index(name), i) for name in pool for i in range(len(flat[name])))
    target, count = round(sparsity * len(units)), 0
    for _, layer, i in units:
        name = names[layer]
        if count < target and len(pruned[name]) < max(dead[name], len(flat[name]) - floor[name]):
            pruned[name].add(i)
            count += 1
    for name in pool:
        pruned[name] |= {i for i, value in enumerate(flat[name]) if value == -math.inf}
    return pruned


def random_kept(scores, seed, dead_fraction=0.4):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(tensor.shape, generator=generator) >= dead_fraction for name, tensor in scores.items()}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.4, 0.6, 0.9, 1.0])
def test_plan_with_current_mask_matches_brute_force(ties, scope, sparsity):
    scores = random_scores(seed=13, ties=ties)
    kept = random_kept(scores, seed=14)
    kept.pop("layer4")  # a layer without a mask is all live
    ranking = prepare(scores, kept=kept)
    result = plan(ranking, sparsity, scope)
    expected = reference_with_mask(scores, kept, sparsity, scope)
    assert_matches(ranking, result, expected)
    dead = {name: {i for i, alive in enumerate(mask.reshape(-1).tolist()) if not alive} for name, mask in kept.items()}
    assert all(dead[name] <= expected[name] for name in dead)
    assert result.target_met == (result.pruned == (round(sparsity * result.total) if scope == "global" else
                                                   sum(round(sparsity * layer.total) for layer in result.layers)))


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("options", [{"protect": ["layer0"], "overrides": {"conv": 0.1}}, {"min_keep": 0.5}])
def test_current_mask_with_protect_overrides_and_min_keep(scope, options):
    scores = random_scores(seed=21)
    kept = random_kept(scores, seed=22, dead_fraction=0.6)
    ranking = prepare(scores, kept=kept)
    result = plan(ranking, 0.7, scope, **options)
    expected = reference_with_mask(scores, kept, 0.7, scope, options.get("overrides"), options.get("protect", ()),
                                   options.get("min_keep", 0.0))
    assert_matches(ranking, result, expected)
    for name, mask in kept.items():
        assert result.layer(name).pruned >= int((~mask).sum())


@pytest.mark.parametrize("scope", ["local", "global"])
def test_iterating_with_random_scores_gives_exact_counts_and_nested_sets(scope):
    """Round 1 at 50 %, round 2 at 75 %, round 3 at 90 %, each with fresh random scores."""
    sizes = {name: tensor.numel() for name, tensor in random_scores().items()}
    pruned_before = {name: set() for name in sizes}
    kept = None
    for round_index, sparsity in enumerate([0.5, 0.75, 0.9]):
        scores = random_scores(seed=100 + round_index)  # dead units get ordinary, often high, scores
        ranking = prepare(scores, kept=kept)
        result = plan(ranking, sparsity, scope)
        pruned_now = {name: set(pruned_indices(ranking, result, name).tolist()) for name in sizes}
        if scope == "global":
            assert sum(len(units) for units in pruned_now.values()) == round(sparsity * sum(sizes.values()))
        else:
            assert all(len(pruned_now[name]) == round(sparsity * size) for name, size in sizes.items())
        assert all(pruned_before[name] <= pruned_now[name] for name in sizes)
        assert result.target_met
        kept = {}
        for name, tensor in scores.items():
            live = torch.ones(tensor.numel(), dtype=torch.bool)
            live[sorted(pruned_now[name])] = False
            kept[name] = live.reshape(tensor.shape)
        pruned_before = pruned_now


def test_all_live_mask_changes_nothing():
    scores = random_scores(seed=4)
    all_live = {name: torch.ones_like(tensor, dtype=torch.bool) for name, tensor in scores.items()}
    for scope in ("local", "global"):
        assert plan(prepare(scores, kept=all_live), 0.6, scope) == plan(prepare(scores), 0.6, scope)


def test_plan_below_the_current_sparsity_revives_nothing():
    scores = random_scores(seed=6)
    kept = random_kept(scores, seed=7, dead_fraction=0.5)
    dead = sum(int((~mask).sum()) for mask in kept.values())
    ranking = prepare(scores, kept=kept)
    for scope in ("local", "global"):
        result = plan(ranking, 0.1, scope)
        assert result.pruned == dead and not result.target_met and "set_masks" in result.note
        assert_matches(ranking, result, reference_with_mask(scores, kept, 0.1, scope))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_layer_emptied_by_the_mask_is_collapsed_at_any_sparsity(scope):
    scores = random_scores(seed=9)
    kept = {"layer2": torch.zeros(120, dtype=torch.bool), "layer1": torch.zeros(7, dtype=torch.bool)}
    ranking = prepare(scores, kept=kept)
    for sparsity in (0.0, 0.3, 1.0):
        result = plan(ranking, sparsity, scope)
        assert result.collapse_point == 0.0 and result.collapse_layer == "layer1"
        assert {"layer1", "layer2"} <= set(result.collapsed)
    protected = plan(ranking, 0.3, scope, protect=["layer1", "layer2"])
    assert protected.collapse_layer not in ("layer1", "layer2")
    assert protected.layer("layer2").pruned == 120


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collapse_point_with_current_mask_matches_brute_force(seed):
    scores = random_scores(seed=seed, sizes=(5, 9, 3, 12))
    kept = random_kept(scores, seed=seed + 50, dead_fraction=0.5)
    kept["layer2"][0] = True  # not emptied by the mask: it collapses at some sparsity
    total = sum(t.numel() for t in scores.values())
    first_k, first_layer = None, None
    for k in range(total + 1):
        pruned = reference_with_mask(scores, kept, k / total, "global")
        empty = [name for name in scores if len(pruned[name]) == scores[name].numel()]
        if empty:
            first_k, first_layer = k, empty[0]
            break
    ranking = prepare(scores, kept=kept)
    result = plan(ranking, 0.9, "global")
    assert result.collapse_point == pytest.approx(first_k / total) and result.collapse_layer == first_layer
    assert first_layer in plan(ranking, result.collapse_point, "global").collapsed
    assert not plan(ranking, (first_k - 1) / total, "global").collapsed


@pytest.mark.parametrize("sparsity", [0.2, 0.6, 0.93])
def test_large_ranking_with_current_mask_matches_brute_force(sparsity):
    """Enough units that the global cut is refined inside a bracket of the grid."""
    generator = torch.Generator().manual_seed(12)
    scores = {
        "a": torch.randint(0, 50, (40_000,), generator=generator).float(),
        "b": torch.rand(300, 40, generator=generator),
        "c": torch.randn(20_000, generator=generator),
    }
    kept = {"a": torch.rand(40_000, generator=generator) > 0.5, "c": torch.rand(20_000, generator=generator) > 0.3}
    ranking = prepare(scores, kept=kept)
    result = plan(ranking, sparsity, "global", protect=["b"] if sparsity > 0.9 else ())
    expected = reference_with_mask(scores, kept, sparsity, "global", protect=["b"] if sparsity > 0.9 else ())
    assert_matches(ranking, result, expected)


def test_current_mask_errors_name_the_layer_and_the_shape():
    scores = {"a": torch.rand(4, 3), "b": torch.rand(5)}
    with pytest.raises(ExplorerError, match=r"'a'.*\(4, 3\)"):
        prepare(scores, kept={"a": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ExplorerError, match="'zzz'.*a, b"):
        prepare(scores, kept={"zzz": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ExplorerError, match="'b'"):
        prepare(scores, kept={"b": [True] * 5})


def _hand_plan(sizes_kept):
    from explorer.planner import LayerPlan, Plan

    layers = [LayerPlan(name=f"l{i}", total=total, kept=kept, pruned=total - kept, sparsity=(total - kept) / total,
                        collapsed=kept == 0, source="local") for i, (total, kept) in enumerate(sizes_kept)]
    total, pruned = sum(t for t, _ in sizes_kept), sum(t - k for t, k in sizes_kept)
    return Plan(scope="local", sparsity_requested=0.5, sparsity_actual=pruned / total, total=total, pruned=pruned,
                layers=layers, collapsed=[], collapse_point=None, collapse_layer=None)


def test_round_kept_goes_to_the_nearest_multiple_and_never_to_zero_or_past_the_layer():
    from explorer.planner import round_kept

    plan = _hand_plan([(16, 9), (64, 29), (100, 99), (5, 3), (30, 29), (64, 2), (32, 32)])
    rounded = round_kept(plan, 8)
    assert [lp.kept for lp in rounded.layers] == [8, 32, 96, 3, 30, 8, 32]
    assert round_kept(plan, 16).layers[4].kept == 30  # nearest multiple (32) exceeds the layer: it keeps all 30
    assert rounded.pruned == sum(lp.total - lp.kept for lp in rounded.layers)
    assert rounded.sparsity_actual == rounded.pruned / plan.total and "multiples of 8" in rounded.note
    assert round_kept(plan, 1) is plan
    with pytest.raises(ExplorerError, match="whole number"):
        round_kept(plan, 0)


def test_round_to_removes_channels_in_multiples_through_a_real_removal(capsys):
    from explorer import pipeline
    from explorer.data import load_dataset
    from explorer.specs import PlanSpec, ScoringSpec
    from explorer.zoo import build

    dataset = load_dataset("digits")
    for name in ("mlp", "lenet5"):
        torch.manual_seed(0)
        model = build(name, dataset.input_shape, dataset.num_classes).eval()
        prepared = pipeline.prepare(model, ScoringSpec(structure="channel"), dataset=dataset)
        plan = pipeline.preview(prepared, PlanSpec(sparsity=0.3, round_to=8))
        pruned = pipeline.apply(model, prepared, plan)
        widths = {n: m.weight.shape[0] for n, m in pruned.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        for layer in plan.layers:
            assert widths[layer.name] == layer.kept  # what the plan shows is what was removed
            if layer.total >= 8:
                assert layer.kept % 8 == 0 and layer.kept < layer.total, (name, layer)
        pruned(dataset.example_input(2))
    with pytest.raises(ExplorerError, match="needs --structure channel"):
        unstructured = pipeline.prepare(model, ScoringSpec(structure="unstructured"), dataset=dataset)
        pipeline.preview(unstructured, PlanSpec(sparsity=0.3, round_to=8))
    from explorer.cli import main

    assert main(["prune", "--model", "mlp", "--structure", "channel", "--sparsity", "0.3", "--round-to", "16",
                 "--plan-only", "--json"]) == 0
    import json

    shown = json.loads(capsys.readouterr().out)
    assert [layer["kept"] for layer in shown["layers"]] == [176, 96]  # 256 * 0.7 = 179 -> 176; 128 * 0.7 = 90 -> 96
