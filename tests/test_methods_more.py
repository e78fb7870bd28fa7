"""Pruning at initialisation, penalties and learned masks (explorer/methods/at_init.py, regularised.py)."""
import json
import math

import pytest
import torch
import yaml
from torch import nn

from explorer import masking, pipeline, planner
from explorer.cli import main
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.layers import effective_weight, prunable_layers
from explorer.masking import current_masks
from explorer.methods import MethodRun, collapsed_layers, run_method
from explorer.methods.at_init import AtInitParams, sparsity_schedule
from explorer.methods.regularised import SparsityPenalty, penalty_norms
from explorer.models import build, load_model, save_model
from explorer.recipe import Recipe
from explorer.specs import PlanSpec, ScoringSpec
from explorer.train import TrainConfig, TrainState, train

BATCH = 128  # 10 steps per epoch on the digits training split
UNITS = 64 * 256 + 256 * 128 + 128 * 10  # prunable weights of the digits MLP
EXACT = pytest.approx(round(0.8 * UNITS) / UNITS, abs=1e-12)  # 80 % of them, to the weight


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def mlp(digits):
    torch.manual_seed(0)
    return build("mlp", digits.input_shape, digits.num_classes)


def batchnorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def recipe(method: dict, *, source="mlp", structure="unstructured", criterion="magnitude", sparsity=0.8,
           scope="global", epochs=2) -> Recipe:
    return Recipe.from_dict({"model": {"source": source, "baseline": False},
                             "scoring": {"structure": structure, "criterion": criterion},
                             "plan": {"sparsity": sparsity, "scope": scope}, "method": method,
                             "budget": {"epochs": epochs}, "finetune": {"batch_size": BATCH},
                             "measure": {"latency": False}})


def events(outcome) -> list[str]:
    return [point["event"] for point in outcome.trajectory]


# ------------------------------------------------------------------------------------------- at_init


def test_iterative_synflow_keeps_every_layer_where_single_shot_empties_one(digits):
    start = build("lenet5", digits.input_shape, digits.num_classes)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    fresh = MethodRun(model=start, dataset=digits, scoring=ScoringSpec(), plan_spec=PlanSpec(),
                      config=TrainConfig()).fresh_model(0)  # the weights at_init starts from
    single = planner.plan(pipeline.prepare(fresh, ScoringSpec(criterion="synflow"), dataset=digits).ranking,
                          0.95, "global")
    assert single.collapse_point < 0.95 and single.collapsed  # single shot would cut the network in two

    at_init = {"name": "at_init"}
    with pytest.raises(ExplorerError, match="empties"):
        run_method(recipe({**at_init, "rounds": 1}, source="lenet5", criterion="synflow", sparsity=0.95,
                          epochs=1), start, digits)
    outcome = run_method(recipe({**at_init, "rounds": 20}, source="lenet5", criterion="synflow", sparsity=0.95,
                                epochs=1), start, digits)
    assert collapsed_layers(outcome.model) == []
    assert events(outcome) == ["round"] * 19 + ["prune", "epoch"]
    total = sum(module.weight.numel() for _, module in prunable_layers(start))
    cuts = [point["sparsity"] for point in outcome.trajectory[:20]]
    for r, sparsity in enumerate(cuts, start=1):  # the density shrinks by 0.05 ** (1 / 20) each round
        assert abs(sparsity - (1 - 0.05 ** (r / 20))) <= 0.5 / total + 1e-12
    assert cuts[-1] == outcome.trajectory[-1]["sparsity"] == pytest.approx(round(0.95 * total) / total, abs=1e-12)
    assert all(point["step"] == 0 for point in outcome.trajectory[:20])  # pruned before any training
    assert all((start.state_dict()[k] == v).all() for k, v in before.items())


def test_at_init_defaults_its_rounds_per_criterion_and_prunes_snip_in_one_shot(digits, mlp):
    assert [AtInitParams().rounds_for(c) for c in ("synflow", "snip", "magnitude", "random")] == [100, 1, 1, 1]
    assert sparsity_schedule(0.99, 2) == pytest.approx([0.9, 0.99])
    outcome = run_method(recipe({"name": "at_init"}, criterion="snip", epochs=1), mlp, digits)
    assert events(outcome) == ["prune", "epoch"]
    assert [point["sparsity"] for point in outcome.trajectory] == [EXACT] * 2
    trained = dict(prunable_layers(outcome.model))["fc1"]
    assert not torch.equal(trained.weight_orig, mlp.fc1.weight)  # fresh weights, trained


def test_at_init_refuses_trained_weight_criteria_channels_and_bad_rounds(digits, mlp):
    with pytest.raises(ExplorerError, match="at_init.*snip, synflow, random, magnitude.*'taylor'"):
        run_method(recipe({"name": "at_init"}, criterion="taylor", epochs=1), mlp, digits)
    with pytest.raises(ExplorerError, match="works with unstructured structure, not 'channel'"):
        run_method(recipe({"name": "at_init"}, structure="channel", epochs=1), mlp, digits)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ExplorerError, match=r"method\.rounds must be an integer >= 1"):
            recipe({"name": "at_init", "rounds": bad})


# ------------------------------------------------------------------------------------------- penalty


def tiny_conv_net() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        model[0].weight[1] = 0  # a filter that is already zero: its group-lasso subgradient is 0
    return model


@pytest.mark.parametrize("kind", ["l1", "group_lasso", "bn_l1"])
def test_the_penalty_and_its_gradient_match_their_closed_forms(kind):
    model, strength = tiny_conv_net(), 0.3
    conv, norm, linear = model[0], model[1], model[4]
    value = SparsityPenalty(kind, strength).penalty(TrainState(model, None, TrainConfig(), 1, 1))
    value.backward()
    model.requires_grad_(False)  # the closed forms below are plain arithmetic
    if kind == "l1":
        expected = strength * (conv.weight.abs().sum() + linear.weight.abs().sum())
        grads = {conv: strength * torch.sign(conv.weight), linear: strength * torch.sign(linear.weight)}
    elif kind == "group_lasso":
        expected = strength * sum(torch.sqrt((w ** 2).sum()) for layer in (conv, linear) for w in layer.weight)
        rows = {layer: torch.stack([w / torch.sqrt((w ** 2).sum()) if w.any() else torch.zeros_like(w)
                                    for w in layer.weight]) for layer in (conv, linear)}
        grads = {layer: strength * rows[layer] for layer in (conv, linear)}
    else:
        expected = strength * (0.5 + 2.0 + 1.5)
        grads = {norm: strength * torch.tensor([1.0, -1.0, 1.0])}
    assert value.detach().item() == pytest.approx(float(expected), rel=1e-6)
    for layer in (conv, norm, linear):
        grad = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
        assert torch.allclose(grad, grads.get(layer, torch.zeros_like(layer.weight)), atol=1e-7)
    assert torch.isfinite(conv.weight.grad if conv.weight.grad is not None else torch.zeros(1)).all()


@pytest.mark.parametrize("kind", ["l1", "group_lasso", "bn_l1"])
def test_training_with_the_penalty_shrinks_what_it_penalises(digits, kind):
    model = batchnorm_mlp() if kind == "bn_l1" else build("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-2, seed=0)
    plain = train(model, digits, config).model
    penalised = train(model, digits, config, callbacks=[SparsityPenalty(kind, 1e-2)]).model
    norms = {name: penalty_norms(net, kind)
             for name, net in (("start", model), ("plain", plain), ("penalised", penalised))}
    assert set(norms["start"]) == set(norms["plain"]) == set(norms["penalised"]) and norms["plain"]
    total = {name: float(sum(values.sum() for values in layers.values())) for name, layers in norms.items()}
    assert total["penalised"] < min(total["start"], total["plain"])  # same seed, same batches: only the penalty differs


def test_penalty_trains_then_cuts_exactly_then_fine_tunes_on_the_same_schedule(digits, mlp):
    outcome = run_method(recipe({"name": "penalty", "penalty_fraction": 0.25}), mlp, digits)
    assert events(outcome) == ["prune", "epoch", "epoch"]
    assert [point["step"] for point in outcome.trajectory] == [5, 10, 20]  # the cut after a quarter of 20 steps
    assert [point["sparsity"] for point in outcome.trajectory] == [EXACT] * 3
    assert outcome.trajectory[-1]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 19 / 20)) / 2)  # one cosine


def test_channel_penalties_remove_neurons_and_bn_l1_needs_batchnorm(digits, mlp):
    lasso = run_method(recipe({"name": "penalty"}, structure="channel", sparsity=0.5, epochs=1), mlp, digits)
    assert lasso.model.fc1.out_features + lasso.model.fc2.out_features == round(0.5 * (256 + 128))
    slimmed = run_method(recipe({"name": "penalty", "kind": "bn_l1"}, structure="channel", criterion="bn_scale",
                                sparsity=0.5, epochs=1), batchnorm_mlp(), digits)
    assert slimmed.model[1].out_features + slimmed.model[4].out_features == round(0.5 * (64 + 32))
    assert events(slimmed) == ["prune", "epoch"]
    with pytest.raises(ExplorerError, match="bn_l1.*no BatchNorm.*group_lasso"):
        run_method(recipe({"name": "penalty", "kind": "bn_l1"}, structure="channel", epochs=1), mlp, digits)
    with pytest.raises(ExplorerError, match="'l1' prepares unstructured pruning, not channel; use kind group_lasso"):
        run_method(recipe({"name": "penalty", "kind": "l1"}, structure="channel", epochs=1), mlp, digits)
    for key, bad, message in (("kind", "l2", "method.kind must be one of l1, group_lasso, bn_l1"),
                              ("strength", 0, "method.strength must be a number > 0"),
                              ("penalty_fraction", 1, "method.penalty_fraction must be a fraction strictly"),
                              ("penalty_fraction", 0.0, "method.penalty_fraction must be a fraction strictly")):
        with pytest.raises(ExplorerError, match=message):
            recipe({"name": "penalty", key: bad})


# -------------------------------------------------------------------------------------- learned_mask


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    ranking = planner.prepare({name: module.weight.detach().abs() for name, module in prunable_layers(model)})
    return masking.masks(ranking, planner.plan(ranking, sparsity, "global"))


@pytest.mark.parametrize("kind", ["movement", "hard_concrete"])
def test_learned_masks_reach_the_target_exactly_differ_from_magnitude_and_save(digits, mlp, kind, tmp_path):
    outcome = run_method(recipe({"name": "learned_mask", "kind": kind}), mlp, digits)
    assert events(outcome) == ["epoch", "prune", "epoch"]  # learned for 15 of 20 steps, then fine-tuned
    assert [point["sparsity"] for point in outcome.trajectory[1:]] == [EXACT] * 2
    learned, magnitude = current_masks(outcome.model), magnitude_masks(mlp, 0.8)
    moved = sum(int((learned[name] & ~magnitude[name]).sum()) for name in magnitude)
    assert moved > 0.1 * (UNITS - round(0.8 * UNITS))  # over a tenth of the kept weights are not magnitude's
    if kind == "movement":
        assert outcome.trajectory[0]["regrown"] > 0  # the straight-through mask moved while it learned
    x = digits.example_input(8)
    path = save_model(outcome.model, tmp_path / "learned.pt", arch="mlp", input_shape=digits.input_shape,
                      num_classes=digits.num_classes)
    loaded = load_model(str(path))
    assert not masking.current_masks(loaded)  # masks folded into plain weights
    assert torch.allclose(loaded(x), outcome.model(x), atol=1e-6) and torch.isfinite(loaded(x)).all()
    zeros = sum(int((effective_weight(module) == 0).sum()) for _, module in prunable_layers(loaded))
    assert zeros == round(0.8 * UNITS)


def test_learned_mask_refuses_channels_and_settings_of_the_other_kind(digits, mlp):
    with pytest.raises(ExplorerError, match="works with unstructured structure, not 'channel'"):
        run_method(recipe({"name": "learned_mask"}, structure="channel"), mlp, digits)
    for params, message in (({"kind": "l0"}, "method.kind must be one of movement, hard_concrete"),
                            ({"strength": 0.1}, "strength and method.gate_lr tune the L0 gates of kind hard_concrete"),
                            ({"kind": "hard_concrete", "gate_lr": 0}, "method.gate_lr must be a positive"),
                            ({"kind": "hard_concrete", "strength": -1}, "method.strength must be a number > 0")):
        with pytest.raises(ExplorerError, match=message):
            recipe({"name": "learned_mask", **params})


# -------------------------------------------------------------------------------- all three: cancel, CLI


@pytest.mark.parametrize("method, points", [({"name": "at_init", "rounds": 6}, 3), ({"name": "penalty"}, 1),
                                            ({"name": "learned_mask"}, 1)])
def test_cancel_keeps_the_trajectory_so_far(digits, mlp, method, points):
    class CancelAfter:
        def __init__(self):
            self.points = []

        def is_set(self):
            return len(self.points) >= points

    flag = CancelAfter()
    outcome = run_method(recipe(method, epochs=3), mlp, digits, cancel=flag, on_point=flag.points.append)
    assert outcome.cancelled and len(outcome.trajectory) == points
    assert flag.points == outcome.trajectory
    assert outcome.trajectory[-1]["event"] == ("round" if method["name"] == "at_init" else "epoch")


@pytest.mark.parametrize("method, criterion", [({"name": "at_init", "rounds": 5}, "synflow"),
                                               ({"name": "penalty", "kind": "l1"}, "magnitude"),
                                               ({"name": "learned_mask", "kind": "movement"}, "magnitude")])
def test_each_method_runs_from_a_recipe_on_the_command_line(tmp_path, capsys, method, criterion):
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "mlp", "baseline": False, "data": "digits"},
                                    "scoring": {"structure": "unstructured", "criterion": criterion},
                                    "plan": {"sparsity": 0.9, "scope": "local"}, "method": method,
                                    "budget": {"epochs": 1}, "finetune": {"batch_size": 256}}))
    assert main(["run", "--recipe", str(path), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recipe"]["method"] == method and result["collapsed"] == []
    assert "prune" in [point["event"] for point in result["trajectory"]]
    assert result["metrics"]["sparsity_actual"] == pytest.approx(result["trajectory"][-1]["sparsity"])
    assert result["metrics"]["sparsity_actual"] == pytest.approx(0.9, abs=1e-4)
