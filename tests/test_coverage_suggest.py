"""explorer/suggest.py beyond tests/test_suggest.py: plain data out, scans of older versions, mismatched
scores refused, and the CLI's text, each checked against numbers computed here from the scan's rows."""
import dataclasses
import json

import pytest
import torch

from explorer import pipeline
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.models import build
from explorer.recipe import Recipe
from explorer.sensitivity import Cell, Scan
from explorer.specs import ModelSpec, ScoringSpec
from explorer.suggest import evaluate, format_human, suggest
from tests.test_suggest import CONVEX, GRID, SIZES, _scan


def _chosen_drop(drops: dict[str, list[float]], sparsities: dict[str, float]) -> float:
    """The sum of the chosen cells' drops, read off the rows (0 for a unit left dense)."""
    return sum(drops[unit][GRID.index(value)] for unit, value in sparsities.items() if value)


def test_a_suggestion_is_plain_data_and_its_plan_overrides_every_unit():
    suggestion = suggest(_scan(CONVEX), max_drop=0.03)
    data = suggestion.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["goal"] == {"max_drop": 0.03} and set(data["sparsities"]) == set(CONVEX)
    total = _chosen_drop(CONVEX, suggestion.sparsities)
    assert 0 < total <= 0.03 + 1e-12
    assert suggestion.predicted["drop"] == pytest.approx(total) and suggestion.predicted["value"] == pytest.approx(
        0.9 - total)
    weights = sum(value * SIZES[unit] for unit, value in suggestion.sparsities.items())
    assert suggestion.predicted["sparsity"] == pytest.approx(weights / sum(SIZES.values()))
    plan = suggestion.plan_spec()
    assert plan.scope == "local" and dict(plan.overrides) == suggestion.sparsities


def test_a_scan_without_its_prunable_count_falls_back_to_the_units_sizes():
    """Scans stored before ``params_prunable`` was kept: unstructured sums each unit's size, channels
    extrapolate a group's weights from its cells (params saved per channel times channels)."""
    scan = _scan(CONVEX)
    older = dataclasses.replace(scan, params_prunable=0)
    now, before = suggest(scan, target_sparsity=0.5), suggest(older, target_sparsity=0.5)
    assert before.sparsities == now.sparsities and before.predicted["sparsity"] == pytest.approx(
        now.predicted["sparsity"])

    channels = {"g1": 16, "g2": 32}
    per_channel = {"g1": 10, "g2": 3}
    cells = [Cell(unit=unit, sparsity=s, value=0.9 - 0.01 * s, drop=0.01 * s, pruned=round(s * n), total=n,
                  params_saved=per_channel[unit] * round(s * n), flops_saved=round(s * n))
             for unit, n in channels.items() for s in GRID]
    scan = Scan(metric="accuracy", measure="accuracy", higher_is_better=True, split="val", samples=100, base=0.9,
                structure="channel", criterion="magnitude", sparsities=list(GRID), units=list(channels), cells=cells,
                params_prunable=0, flops_dense=100)
    suggestion = suggest(scan, max_drop=1.0)  # every unit at the top of the grid
    assert suggestion.sparsities == {"g1": GRID[-1], "g2": GRID[-1]}
    weights = sum(per_channel[u] * channels[u] for u in channels)  # 160 + 96
    saved = sum(per_channel[u] * round(GRID[-1] * channels[u]) for u in channels)
    assert suggestion.predicted["sparsity"] == pytest.approx(saved / weights)


def test_mismatched_or_missing_inputs_are_one_line():
    with pytest.raises(ExplorerError, match="needs a sensitivity Scan, got str"):
        suggest("a scan", max_drop=0.1)
    with pytest.raises(ExplorerError, match="no count of the dense model's FLOPs"):
        suggest(dataclasses.replace(_scan(CONVEX), flops_dense=0), target_flops=0.3)
    empty = {unit: [0.0] * len(GRID) for unit in CONVEX}
    hollow = dataclasses.replace(_scan(empty), params_prunable=0,
                                 cells=[dataclasses.replace(c, total=0, pruned=0, params_saved=0)
                                        for c in _scan(empty).cells])
    with pytest.raises(ExplorerError, match="hold no weights"):
        suggest(hollow, max_drop=0.1)

    suggestion = suggest(_scan(CONVEX), max_drop=0.03)  # scanned unstructured / magnitude
    with pytest.raises(ExplorerError, match="suggestion was scanned with unstructured / magnitude"):
        suggestion.recipe(Recipe(model=ModelSpec("mlp"), scoring=ScoringSpec("unstructured", "random")))
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build("mlp", data.input_shape, data.num_classes)
    random_scores = pipeline.prepare(model, ScoringSpec("unstructured", "random"), dataset=data)
    with pytest.raises(ExplorerError, match="prepared scores are unstructured / random, the scan"):
        suggest(_scan(CONVEX), max_drop=0.03, prepared=random_scores)
    with pytest.raises(ExplorerError, match="prepared scores are unstructured / random, the suggestion"):
        evaluate(model, data, random_scores, suggestion)


def test_the_text_output_lists_every_unit_and_the_predicted_numbers():
    scan = _scan(CONVEX)
    suggestion = suggest(scan, target_sparsity=0.4)
    result = {"goal": suggestion.goal, "sparsities": suggestion.sparsities, "predicted": suggestion.predicted,
              "actual": None, "note": suggestion.note, "saved_recipe": "/tmp/r.yaml",
              "scan": {"structure": "unstructured", "criterion": "magnitude", "metric": "accuracy",
                       "measure": "accuracy", "samples": 100, "split": "val", "base": 0.9}}
    lines = format_human(result).splitlines()
    assert lines[0] == "goal target sparsity 0.4: unstructured magnitude, accuracy (accuracy) on the first 100 of " \
                       "val, dense 0.9"
    for unit, value in suggestion.sparsities.items():
        assert f"  {unit:32s} {value:6.0%}" in lines
    predicted = next(line for line in lines if line.startswith("predicted"))
    total = _chosen_drop(CONVEX, suggestion.sparsities)
    assert f"accuracy {0.9 - total:.4g} (drop {total:.4g})" in predicted
    assert f"sparsity {suggestion.predicted['sparsity']:.1%}" in predicted
    assert not any(line.startswith("actual") for line in lines)
    assert lines[-1].startswith("recipe written to /tmp/r.yaml")
