"""Methods over training time: the shared runner, one_shot, budgets, trajectories and bad input."""
import json
import math

import pytest
import yaml

from explorer.cli import main
from explorer.errors import ExplorerError
from explorer.methods import METHODS, run_method
from explorer.models import build
from explorer.data import load_dataset
from explorer.recipe import Recipe, run_recipe

TRAJECTORY_KEYS = {"step", "epoch", "sparsity", "train_loss", "val_accuracy", "metric", "val_metric", "lr", "regrown",
                   "event"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def recipe(**sections) -> Recipe:
    values = {"model": {"source": "mlp", "baseline": False}, "scoring": {"structure": "unstructured"},
              "plan": {"sparsity": 0.8, "scope": "global"}, "measure": {"latency": False}}
    values.update(sections)
    return Recipe.from_dict(values)


def test_one_shot_prunes_once_then_spends_the_budget_fine_tuning(digits):
    model = build("mlp", digits.input_shape, digits.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = run_method(recipe(budget={"epochs": 2}, finetune={"batch_size": 128}), model, digits)
    steps_per_epoch = math.ceil(len(digits.y_train) / 128)
    events = [p["event"] for p in outcome.trajectory]
    assert events == ["prune", "epoch", "epoch"]
    assert [p["step"] for p in outcome.trajectory] == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert [p["epoch"] for p in outcome.trajectory] == [0, 1, 2]
    units = 64 * 256 + 256 * 128 + 128 * 10
    for point in outcome.trajectory:
        assert set(point) == TRAJECTORY_KEYS and point["regrown"] == 0
        assert point["sparsity"] == pytest.approx(round(0.8 * units) / units)  # masks hold during training
    assert all(0 <= p["val_accuracy"] <= 1 and p["train_loss"] > 0 for p in outcome.trajectory[1:])
    assert all(k in model.state_dict() and (model.state_dict()[k] == v).all() for k, v in before.items())


def test_budget_zero_and_unknown_methods_are_refused_with_one_line():
    with pytest.raises(ExplorerError, match=r"budget\.epochs must be a whole number from 1 to 1,000"):
        recipe(budget={"epochs": 0})
    with pytest.raises(ExplorerError, match=r"method\.name 'annealing' is not one of"):
        recipe(method={"name": "annealing"})
    with pytest.raises(ExplorerError, match=r"unknown setting\(s\) rounds in 'method'"):
        recipe(method={"name": "one_shot", "rounds": 3})


def test_a_recipe_runs_its_method_headless_and_prints_the_trajectory(tmp_path, capsys):
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump({"model": "mlp", "data": "digits", "structure": "unstructured",
                                    "criterion": "magnitude", "scope": "global", "sparsity": 0.9,
                                    "method": {"name": "one_shot"}, "budget": {"epochs": 1}}))
    assert main(["run", "--recipe", str(path), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"recipe", "metrics", "collapsed", "trajectory"}
    assert result["recipe"]["method"] == {"name": "one_shot"} and result["recipe"]["budget"] == {"epochs": 1, "view": "counted", "start_epochs": 0}
    assert [p["event"] for p in result["trajectory"]] == ["prune", "epoch"]
    assert set(result["trajectory"][0]) == TRAJECTORY_KEYS
    assert result["metrics"]["sparsity_actual"] == pytest.approx(result["trajectory"][-1]["sparsity"])
    assert result["metrics"]["sparsity_actual"] == pytest.approx(0.9, abs=1e-4)


def test_cancel_keeps_the_trajectory_so_far(digits):
    class CancelAfterFirstEpoch:
        def __init__(self):
            self.points = []

        def is_set(self):
            return any(p["event"] == "epoch" for p in self.points)

    flag = CancelAfterFirstEpoch()
    outcome = run_method(recipe(budget={"epochs": 3}), build("mlp", digits.input_shape, digits.num_classes),
                         digits, cancel=flag, on_point=flag.points.append)
    assert outcome.cancelled
    assert [p["event"] for p in outcome.trajectory] == ["prune", "epoch"]
    assert flag.points == outcome.trajectory


def test_every_registered_method_documents_itself():
    for name, method in METHODS.items():
        assert method.name == name and method.summary and len((type(method).__doc__ or "").split()) > 20
