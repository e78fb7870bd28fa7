"""The methods lab (explorer/methods/lab.py) when the run store refuses its runs: every method still runs."""
import json

import pytest
import torch

from explorer.data import load_dataset
from explorer.methods.lab import chance_note, run_lab
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


def test_a_result_at_chance_says_so_with_its_numbers():
    trajectory = [{"epoch": 0, "train_loss": None}, {"epoch": 1, "train_loss": 2.31}, {"epoch": 3, "train_loss": 2.29}]
    note = chance_note("set", {"accuracy": 0.093}, trajectory, 10)
    assert note == ("set ended at chance: test accuracy 9.3% (chance 10.0%); the training loss ended at 2.29 "
                    "(ln 10 = 2.30). Too small a budget to learn from where it started: give it more epochs "
                    "before reading its number.")
    assert chance_note("one_shot", {"accuracy": 0.151}, trajectory, 10) is None  # above 1.5 x chance
    assert chance_note("one_shot", {"accuracy": 0.149}, [], 10) == (
        "one_shot ended at chance: test accuracy 14.9% (chance 10.0%), and it was not trained after the cut: the cut "
        "left too little. Fine-tune it or lower the sparsity before reading its number.")
    assert chance_note("set", {"accuracy": None}, trajectory, 10) is None  # no accuracy: a transformer's run
    assert chance_note("set", None, trajectory, 10) is None
