"""The methods lab (explorer/methods/lab.py) when the run store refuses its runs: every method still runs."""
import json

import pytest
import torch

from explorer.data import load_dataset
from explorer.methods.lab import run_lab
from explorer.models import build, load_model
from explorer.recipe import Recipe
from explorer.store import RunStore
from tests.storefaults import damage


def test_a_refused_save_keeps_the_methods_result_and_the_next_method_runs(tmp_path):
    digits = load_dataset("digits")
    model = build("mlp", digits.input_shape, digits.num_classes)
    recipe = Recipe.from_dict({"model": {"source": "mlp", "baseline": False}, "scoring": {"structure": "unstructured"},
                               "plan": {"sparsity": 0.8, "scope": "global"}, "budget": {"epochs": 1},
                               "measure": {"latency": False}})
    damage(tmp_path / "runs.sqlite")
    settings = {"arch": "mlp", "input_shape": list(digits.input_shape), "num_classes": digits.num_classes}
    results = run_lab(recipe, ["one_shot", "penalty"], model, digits, store=RunStore(tmp_path), model_name="mlp",
                      settings=settings)
    assert [r.method for r in results] == ["one_shot", "penalty"]  # the refusal did not end the lab
    kept_files = sorted((tmp_path / "unsaved").glob("run-*.json"))
    assert len(kept_files) == 2
    for result in results:
        assert result.run_id is None and result.metrics is not None and result.model is not None
        assert result.metrics["sparsity_actual"] == pytest.approx(0.8, abs=1e-4)
        assert "\n" not in result.error and result.error.startswith(f"{result.method}: The run store ")
        assert f"kept in {result.kept}" in result.error and str(tmp_path / "runs.sqlite") in result.error
        [entry] = json.loads(open(result.kept).read())
        assert entry["recipe"]["method"]["name"] == result.method and entry["metrics"] == result.metrics
        assert entry["trajectory"] == result.trajectory
        x = digits.x_test[:16]
        assert torch.equal(load_model(result.kept[:-len(".json")] + ".pt")(x), result.model(x))
    assert {r.kept for r in results} == {str(path) for path in kept_files}
