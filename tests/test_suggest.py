"""Suggested recipe: the greedy against brute force, the goals, the replayed recipe, actual = prune-and-evaluate,
bad input."""
import contextlib
import io
import itertools
import json
import math
import random

import pytest
import torch

from explorer import cli, pipeline, sensitivity
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model, prunable_layers
from explorer.models import build, save_model
from explorer.recipe import Recipe, load_recipe, run_recipe
from explorer.sensitivity import Cell, Scan
from explorer.specs import MeasureSpec, ModelSpec, ScoringSpec
from explorer.suggest import evaluate, suggest
from explorer.train import TrainConfig, train

GRID = [0.2, 0.4, 0.6, 0.8]
SIZES = {"a": 100, "b": 300, "c": 50}
FLOPS_PER_WEIGHT = {"a": 49, "b": 1, "c": 16}  # a conv's weight is used at every output position, a Linear's once


def _scan(drops: dict[str, list[float]], *, base: float = 0.9, cancelled: bool = False) -> Scan:
    """A synthetic unstructured scan: unit -> drop at each GRID sparsity; params_saved = pruned weights."""
    cells = [Cell(unit=unit, sparsity=s, value=base - d, drop=d, pruned=round(s * SIZES[unit]), total=SIZES[unit],
                  params_saved=round(s * SIZES[unit]), flops_saved=FLOPS_PER_WEIGHT[unit] * round(s * SIZES[unit]))
             for unit, row in drops.items() for s, d in zip(GRID, row)]
    return Scan(metric="accuracy", measure="accuracy", higher_is_better=True, split="val", samples=100, base=base,
                structure="unstructured", criterion="magnitude", sparsities=list(GRID), units=list(drops),
                cells=cells, params_prunable=sum(SIZES[unit] for unit in drops), cancelled=cancelled,
                flops_dense=sum(FLOPS_PER_WEIGHT[unit] * SIZES[unit] for unit in drops))


# strictly convex, increasing rows with distinct slopes: no ties between units
CONVEX = {"a": [0.01, 0.03, 0.07, 0.15], "b": [0.004, 0.012, 0.03, 0.07], "c": [0.002, 0.009, 0.025, 0.06]}


def _combinations(drops):
    """Every choice of (0 or a grid point) per unit: (saved weights, total drop, choice)."""
    options = {unit: [(0.0, 0, 0.0)] + [(s, round(s * SIZES[unit]), d) for s, d in zip(GRID, row)]
               for unit, row in drops.items()}
    for choice in itertools.product(*options.values()):
        yield sum(o[1] for o in choice), sum(o[2] for o in choice), dict(zip(drops, (o[0] for o in choice)))


def _lower_hull(points):
    """Vertices of the lower convex hull of (saved, drop) points, left to right (monotone chain)."""
    hull = []
    for point in sorted(set(points)):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (point[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def test_on_convex_rows_the_greedy_finds_the_brute_force_optimum_at_every_hull_vertex():
    scan = _scan(CONVEX)
    total = sum(SIZES.values())
    combos = list(_combinations(CONVEX))
    vertices = _lower_hull([(saved, round(drop, 12)) for saved, drop, _ in combos])
    assert len(vertices) > 6
    for saved, drop in vertices[1:]:
        by_target = suggest(scan, target_sparsity=saved / total)
        best = min(d for s, d, _ in combos if s >= saved)
        assert by_target.predicted["drop"] == pytest.approx(best)
        assert by_target.predicted["sparsity"] * total == pytest.approx(saved)
        by_drop = suggest(scan, max_drop=drop)
        most = max(s for s, d, _ in combos if d <= drop + 1e-12)
        assert by_drop.predicted["sparsity"] * total == pytest.approx(most)
        assert by_drop.predicted["drop"] <= drop + 1e-12


def test_a_flops_target_is_the_brute_force_optimum_over_flops_not_weights():
    scan = _scan(CONVEX)
    dense = sum(FLOPS_PER_WEIGHT[u] * SIZES[u] for u in SIZES)
    options = {unit: [(0.0, 0, 0.0)] + [(s, FLOPS_PER_WEIGHT[unit] * round(s * SIZES[unit]), d)
                                        for s, d in zip(GRID, row)] for unit, row in CONVEX.items()}
    combos = [(sum(o[1] for o in c), sum(o[2] for o in c)) for c in itertools.product(*options.values())]
    vertices = _lower_hull([(saved, round(drop, 12)) for saved, drop in combos])
    for saved, _ in vertices[1:]:
        result = suggest(scan, target_flops=saved / dense)
        assert result.predicted["drop"] == pytest.approx(min(d for f, d in combos if f >= saved))
        assert result.predicted["flops_reduction"] == pytest.approx(result.predicted["flops_saved"] / dense)
        assert result.predicted["flops_saved"] >= saved
    # the same reduction asked of weights picks other units: "a" holds few weights but most FLOPs
    by_flops, by_weights = suggest(scan, target_flops=0.5), suggest(scan, target_sparsity=0.5)
    assert by_flops.sparsities["a"] > by_weights.sparsities["a"]
    with pytest.raises(ExplorerError, match="FLOPs reduction"):
        suggest(scan, target_flops=0.99)


@pytest.mark.parametrize("seed", range(6))
def test_noisy_rows_respect_the_goal_and_use_the_running_max(seed):
    rng = random.Random(seed)
    drops = {unit: [rng.uniform(-0.02, 0.1) * (1 + 3 * s) for s in GRID] for unit in SIZES}
    scan = _scan(drops)
    total = sum(SIZES.values())
    for budget in (0.0, 0.05, 0.2):
        result = suggest(scan, max_drop=budget)
        assert result.predicted["drop"] <= budget + 1e-12
        running = {unit: max([0.0] + [d for s, d in zip(GRID, drops[unit]) if s <= result.sparsities[unit]])
                   for unit in drops}
        assert result.predicted["drop"] == pytest.approx(sum(running.values()))
        assert set(result.sparsities.values()) <= {0.0, *GRID}
        # nothing left out fits: every single further move would exceed the budget
        for unit in drops:
            for s in GRID:
                if s > result.sparsities[unit]:
                    extra = max(running[unit], max(d for g, d in zip(GRID, drops[unit]) if g <= s)) - running[unit]
                    assert result.predicted["drop"] + extra > budget - 1e-12
    for target in (0.1, 0.5, 0.79):
        result = suggest(scan, target_sparsity=target)
        saved = sum(round(s * SIZES[unit]) for unit, s in result.sparsities.items())
        assert saved >= math.ceil(target * total - 1e-9)
        assert result.predicted["sparsity"] == pytest.approx(saved / total)
        assert result.predicted["value"] == pytest.approx(scan.base - result.predicted["drop"])


def test_a_target_between_grid_points_is_approached_from_above_and_the_overshoot_is_said():
    flat = {unit: [0.0] * len(GRID) for unit in SIZES}  # nothing costs anything: only the target limits
    result = suggest(_scan(flat), target_sparsity=0.5)
    assert 0.5 <= result.predicted["sparsity"] < 0.55
    coarse = suggest(_scan({"b": [0.0, 0.0, 0.0, 0.0]}), target_sparsity=0.3)  # one unit: 40 % is the next point
    assert coarse.sparsities == {"b": 0.4}
    assert "coarse" in coarse.note and "40.0%" in coarse.note


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one goal"),
    ({"max_drop": 0.1, "target_sparsity": 0.5}, "exactly one goal"),
    ({"max_drop": -0.01}, "negative"),
    ({"target_sparsity": 1.0}, "outside [0, 1)"),
    ({"target_sparsity": -0.1}, "outside [0, 1)"),
    ({"target_sparsity": float("nan")}, "must be a number"),
    ({"target_sparsity": 0.85}, "No combination"),
    ({"target_flops": 1.0}, "outside [0, 1)"),
    ({"target_flops": 0.5, "max_drop": 0.1}, "exactly one goal"),
])
def test_bad_goals_are_one_line(kwargs, message):
    with pytest.raises(ExplorerError, match=message.replace("[", r"\[").replace(")", r"\)")) as info:
        suggest(_scan(CONVEX), **kwargs)
    assert "\n" not in str(info.value)


def test_a_cancelled_or_empty_scan_is_one_line():
    with pytest.raises(ExplorerError, match="cancelled"):
        suggest(_scan(CONVEX, cancelled=True), max_drop=0.1)
    empty = _scan(CONVEX)
    empty.cells = []
    with pytest.raises(ExplorerError, match="no complete rows"):
        suggest(empty, max_drop=0.1)


def test_a_collapsed_cell_is_never_chosen():
    scan = _scan({"a": [0.0] * 4, "b": [0.0] * 4})
    for cell in scan.row("a")[-1:]:
        cell.collapsed = True
    result = suggest(scan, max_drop=0.0)
    assert result.sparsities == {"a": 0.6, "b": 0.8}


# --- on real models: lenet5 / digits (trained briefly, saved so a recipe can load it) -------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def lenet_file(digits, tmp_path_factory):
    torch.manual_seed(0)
    model = train(build("lenet5", digits.input_shape, digits.num_classes), digits,
                  TrainConfig(epochs=2, lr=3e-3, seed=0)).model.cpu().eval()
    path = tmp_path_factory.mktemp("suggest") / "lenet5.pt"
    save_model(model, path, arch="lenet5", input_shape=digits.input_shape, num_classes=digits.num_classes)
    return path


def _resolved(path):
    spec = ModelSpec(source=str(path), data="digits").validate()
    model, dataset, _ = pipeline.resolve_model(spec, seed=0)
    return spec, model, dataset


def _suggested(path, scoring, **goal):
    spec, model, dataset = _resolved(path)
    prepared = pipeline.prepare(model, scoring, dataset=dataset, seed=0)
    result = sensitivity.scan(model, dataset, scoring, sparsities=[0.3, 0.6, 0.9], samples=256, prepared=prepared)
    return spec, model, dataset, prepared, suggest(result, **goal, prepared=prepared)


def _direct_magnitude_accuracy(model, dataset, sparsities, split):
    """Independent prune-and-evaluate: zero each layer's smallest |w| (round(s * n) of them) and count hits."""
    pruned = clone_model(model).eval()
    with torch.no_grad():
        for name, module in prunable_layers(pruned):
            flat = module.weight.view(-1)
            flat[flat.abs().argsort()[:round(sparsities[name] * flat.numel())]] = 0.0
        x, y = dataset.split(split)
        correct = (pruned(x).argmax(1) == y).float().mean().item()
    return correct, sum(round(sparsities[n] * m.weight.numel()) for n, m in prunable_layers(model))


def test_actual_is_a_direct_prune_and_evaluate_and_the_recipe_replays_it(lenet_file):
    scoring = ScoringSpec()
    spec, model, dataset, prepared, suggestion = _suggested(lenet_file, scoring, target_sparsity=0.7)
    assert suggestion.predicted["sparsity"] >= 0.7
    on_test = evaluate(model, dataset, prepared, suggestion, split="test")
    accuracy, removed = _direct_magnitude_accuracy(model, dataset, suggestion.sparsities, "test")
    assert on_test.actual["value"] == pytest.approx(accuracy)
    total = sum(m.weight.numel() for _, m in prunable_layers(model))
    assert on_test.actual["sparsity"] == pytest.approx(removed / total)
    assert on_test.actual["sparsity"] == pytest.approx(suggestion.predicted["sparsity"])
    assert "layers interact" in on_test.note

    recipe = suggestion.recipe(Recipe(model=spec, scoring=scoring, measure=MeasureSpec(latency=False)))
    outcome = run_recipe(recipe)
    layers = {lp.name: lp for lp in outcome["plan"].layers}
    assert set(layers) == set(suggestion.sparsities)
    for unit, sparsity in suggestion.sparsities.items():
        assert layers[unit].pruned == round(sparsity * layers[unit].total)
    assert outcome["metrics"]["accuracy"] == pytest.approx(on_test.actual["value"])
    assert outcome["metrics"]["sparsity_actual"] == pytest.approx(on_test.actual["sparsity"])


def test_channel_groups_are_override_keys_and_replay_physically(lenet_file):
    scoring = ScoringSpec(structure="channel")
    spec, model, dataset, prepared, suggestion = _suggested(lenet_file, scoring, max_drop=0.05)
    assert set(suggestion.sparsities) == {group.name for group in prepared.groups}
    assert any(suggestion.sparsities.values())
    on_test = evaluate(model, dataset, prepared, suggestion, split="test")
    outcome = run_recipe(suggestion.recipe(Recipe(model=spec, scoring=scoring, measure=MeasureSpec(latency=False))))
    for layer_plan in outcome["plan"].layers:
        assert layer_plan.pruned == round(suggestion.sparsities[layer_plan.name] * layer_plan.total)
    assert outcome["metrics"]["accuracy"] == pytest.approx(on_test.actual["value"])
    assert outcome["metrics"]["sparsity_actual"] == pytest.approx(on_test.actual["sparsity"])
    # groups sharing a layer are counted once: the predicted sparsity is the one measured after removal
    assert suggestion.predicted["sparsity"] == pytest.approx(on_test.actual["sparsity"], abs=0.005)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_the_command_prints_the_contract_and_its_recipe_runs(lenet_file, tmp_path):
    recipe_path = tmp_path / "suggested.yaml"
    code, out, _ = _cli(["suggest", "--model", str(lenet_file), "--data", "digits", "--max-drop", "0.03",
                         "--sparsities", "0.3,0.6,0.9", "--samples", "256", "--json",
                         "--save-recipe", str(recipe_path)])
    assert code == 0
    result = json.loads(out)
    assert {"goal", "sparsities", "predicted", "actual", "note", "recipe", "scan"} <= set(result)
    assert result["goal"] == {"max_drop": 0.03}
    assert result["predicted"]["drop"] <= 0.03 + 1e-12
    assert {"seconds", "samples", "metric"} <= set(result["scan"]) and result["scan"]["samples"] == 256
    assert result["actual"]["samples"] == 256 and result["actual"]["split"] == "val"
    assert load_recipe(recipe_path).to_dict() == result["recipe"]
    assert result["recipe"]["plan"]["overrides"] == result["sparsities"]
    code, out, _ = _cli(["run", "--recipe", str(recipe_path), "--no-latency", "--json"])
    assert code == 0
    assert json.loads(out)["sparsity_actual"] == pytest.approx(result["actual"]["sparsity"])


@pytest.mark.parametrize("argv, message", [
    (["--max-drop", "0.1", "--target-sparsity", "0.5"], "not allowed with"),
    ([], "one of the arguments --max-drop --target-sparsity --target-flops is required"),
    (["--max-drop", "-0.1"], "negative"),
    (["--target-sparsity", "1.5"], "outside [0, 1)"),
    (["--target-sparsity", "0.99", "--sparsities", "0.5"], "No combination"),
])
def test_bad_flags_exit_2_with_one_line(argv, message):
    code, _, err = _cli(["suggest", "--model", "mlp", "--data", "digits", "--samples", "64", *argv])
    assert code == 2
    assert message in err and err.count("\n") == 1
