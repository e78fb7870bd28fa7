"""Pruning during training: gradual (and soft) pruning, SET and RigL (explorer/methods/during.py)."""
import json
import math

import pytest
import torch
import yaml
from torch import nn
from torch.nn.utils import prune

from explorer.cli import main
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.layers import prunable_layers
from explorer.methods import MethodRun, run_method
from explorer.methods.during import _Evolve, _straight_through, erk_densities, initial_masks
from explorer.models import build
from explorer.recipe import Recipe
from explorer.train import Callback

UNITS = 64 * 256 + 256 * 128 + 128 * 10  # prunable weights of the digits MLP


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def mlp(digits):
    torch.manual_seed(0)
    return build("mlp", digits.input_shape, digits.num_classes)


def recipe(method: dict, *, epochs: int = 2, batch_size: int = 256, lr: float = 1e-3, sparsity: float = 0.8,
           structure: str = "unstructured", **plan) -> Recipe:
    return Recipe.from_dict({"model": {"source": "mlp", "baseline": False}, "scoring": {"structure": structure},
                             "plan": {"sparsity": sparsity, "scope": "global", **plan}, "method": method,
                             "budget": {"epochs": epochs}, "finetune": {"batch_size": batch_size, "lr": lr},
                             "measure": {"latency": False}})


def pruned_units(model: nn.Module) -> int:
    """Weights the masks switch off (a layer without a mask keeps all of its weights)."""
    return sum(int((~module.weight_mask.bool()).sum()) for _, module in prunable_layers(model)
               if hasattr(module, "weight_mask"))


def updates(trajectory):
    return [point for point in trajectory if point["event"] == "update"]


# ---------------------------------------------------------------------------------------------- gradual


def test_gradual_sparsity_after_each_update_is_the_cubic_schedule(digits):
    start = mlp(digits)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    method = {"name": "gradual", "initial_sparsity": 0.2, "delta_t": 2, "end_fraction": 0.75}
    outcome = run_method(recipe(method), start, digits)  # 5 steps an epoch, 10 in all: phase ends at step 8
    points = updates(outcome.trajectory)
    assert [p["step"] for p in points] == [0, 2, 4, 6, 8]  # t0 + k Δt, k = 0..n with n = 8 // 2
    for k, point in enumerate(points):
        s_t = 0.8 + (0.2 - 0.8) * (1 - k / 4) ** 3
        assert point["sparsity"] * UNITS == pytest.approx(round(s_t * UNITS), abs=1e-6)
        assert point["regrown"] == 0
    epochs = [p for p in outcome.trajectory if p["event"] == "epoch"]
    assert [p["step"] for p in epochs] == [5, 10]
    assert epochs[-1]["sparsity"] * UNITS == pytest.approx(round(0.8 * UNITS), abs=1e-6)  # fixed after the last
    assert pruned_units(outcome.model) == round(0.8 * UNITS)
    assert all((start.state_dict()[k] == v).all() for k, v in before.items())


def test_gradual_waits_for_its_start_epoch_and_may_end_with_the_budget(digits):
    method = {"name": "gradual", "start_epoch": 1, "end_fraction": 1.0}
    outcome = run_method(recipe(method), mlp(digits), digits)  # 5 steps an epoch, 10 in all
    points = updates(outcome.trajectory)
    assert [p["step"] for p in points] == [5, 6, 7, 8, 9, 10]  # default Δt: about 10 updates, at least 1 step
    expected = [0.8 - 0.8 * (1 - k / 5) ** 3 for k in range(6)]
    assert [round(p["sparsity"] * UNITS) for p in points] == [round(s * UNITS) for s in expected]
    first_epoch = outcome.trajectory[:2]  # dense until t0 = 5; the update at t0 prunes s_i = 0
    assert [(p["event"], p["step"], p["sparsity"]) for p in first_epoch] == [("update", 5, 0.0), ("epoch", 5, 0.0)]


def test_straight_through_hook_masks_the_forward_but_passes_the_whole_gradient():
    torch.manual_seed(0)
    layer, dense = nn.Linear(6, 4), nn.Linear(6, 4)
    dense.load_state_dict(layer.state_dict())
    mask = torch.rand(4, 6) > 0.5
    prune.custom_from_mask(layer, "weight", mask)
    layer.register_forward_pre_hook(_straight_through)
    x = torch.randn(3, 6)
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer(x).square().sum().backward()
    dense(x).square().sum().backward()
    assert torch.equal(layer(x), dense(x))
    assert torch.allclose(layer.weight_orig.grad, dense.weight.grad)  # pruned entries get their gradient too
    assert layer.weight_orig.grad[~mask].abs().sum() > 0


def test_soft_gradual_lets_pruned_weights_come_back_and_still_ends_at_the_target(digits):
    method = {"name": "gradual", "regrow": True, "delta_t": 2, "end_fraction": 0.75}
    outcome = run_method(recipe(method, lr=0.01), mlp(digits), digits)
    points = updates(outcome.trajectory)
    assert sum(p["regrown"] for p in points) > 0
    assert points[-1]["sparsity"] * UNITS == pytest.approx(round(0.8 * UNITS), abs=1e-6)
    assert outcome.trajectory[-1]["sparsity"] * UNITS == pytest.approx(round(0.8 * UNITS), abs=1e-6)
    assert pruned_units(outcome.model) == round(0.8 * UNITS)
    hooks = [hook for _, module in prunable_layers(outcome.model) for hook in module._forward_pre_hooks.values()]
    assert all(isinstance(hook, prune.BasePruningMethod) for hook in hooks)  # no straight-through left behind


# ---------------------------------------------------------------------------------------------- sparse training


class MaskWatch(Callback):
    """Pruned-weight count before every forward pass and after every step, and the masks after each step."""

    def __init__(self):
        self.counts, self.masks = [], []

    def on_step_start(self, state):
        self.counts.append(pruned_units(state.model))

    def on_step_end(self, state):
        self.counts.append(pruned_units(state.model))
        self.masks.append({name: module.weight_mask.clone() for name, module in prunable_layers(state.model)
                           if hasattr(module, "weight_mask")})


@pytest.fixture(scope="module")
def sparse_runs(digits):
    """SET and RigL on the MLP, 2 epochs of 5 steps, with a MaskWatch inside the training loop."""
    runs = {}
    original = MethodRun.train
    for name in ("set", "rigl"):
        watch = MaskWatch()

        def watched(self, model, epochs, *, callbacks=(), watch=watch, **kwargs):
            return original(self, model, epochs, callbacks=[*callbacks, watch], **kwargs)

        MethodRun.train = watched
        try:
            runs[name] = (run_method(recipe({"name": name}), mlp(digits), digits), watch)
        finally:
            MethodRun.train = original
    return runs


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_sparse_training_keeps_the_sparsity_exact_while_the_masks_move(sparse_runs, name):
    outcome, watch = sparse_runs[name]
    target = round(0.8 * UNITS)
    assert len(watch.counts) == 2 * 10 and set(watch.counts) == {target}  # before and after every step
    # default Δt = max(1, min(one epoch, round(T_end / 10))) = 1 with T_end = round(0.75 * 10) = 8: masks change
    # before steps 1, 2, ..., 8, never afterwards
    changed = [step for step in range(1, 10)
               if any(not torch.equal(mask, watch.masks[step - 1][layer]) for layer, mask in watch.masks[step].items())]
    assert set(changed) <= set(range(1, 9)) and len(changed) >= 6
    points = updates(outcome.trajectory)
    assert [p["step"] for p in points] == list(range(2, 10))  # recorded after the first step on new masks
    assert sum(p["regrown"] for p in points) > 0
    assert outcome.trajectory[0]["event"] == "prune" and outcome.trajectory[0]["sparsity"] * UNITS == target
    assert pruned_units(outcome.model) == target
    # the trajectory counts the mask: a weight grown back is live even where it stays zero (SET grows some on
    # inputs that are always 0, the digit borders), so every point reads the target exactly
    assert all(p["sparsity"] * UNITS == pytest.approx(target, abs=1e-6) for p in outcome.trajectory)


def test_sparse_training_starts_from_fresh_weights_with_erk_densities(sparse_runs, digits):
    outcome, watch = sparse_runs["set"]
    shapes = {name: tuple(module.weight.shape) for name, module in prunable_layers(mlp(digits))}
    densities = bisected_erk(shapes, 0.8)
    assert densities["classifier"] == 1.0  # (128 + 10) / 1280 ε > 1: kept dense
    first = watch.masks[0]
    assert "classifier" not in first
    for layer, mask in first.items():
        assert abs(int(mask.sum()) - densities[layer] * mask.numel()) <= 1


def bisected_erk(shapes, sparsity):
    """ERK by bisection on ε: sum_l min(1, ε (Σ dims)/(Π dims)) n_l = (1 - sparsity) N."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    want = (1 - sparsity) * sum(sizes.values())
    low, high = 0.0, 1e9
    for _ in range(200):
        epsilon = (low + high) / 2
        if sum(min(1.0, epsilon * raw[name]) * sizes[name] for name in sizes) < want:
            low = epsilon
        else:
            high = epsilon
    return {name: min(1.0, high * raw[name]) for name in sizes}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_erk_densities_match_an_independent_solution_and_the_total(sparsity):
    torch.manual_seed(0)
    model = build("lenet5", (1, 8, 8), 10)
    shapes = {name: tuple(module.weight.shape) for name, module in prunable_layers(model)}
    expected = bisected_erk(shapes, sparsity)
    assert erk_densities(shapes, sparsity) == pytest.approx(expected, rel=1e-6)
    masks = initial_masks(model, sparsity, "erk", seed=3)
    total = sum(math.prod(shape) for shape in shapes.values())
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(sparsity * total)
    for name, mask in masks.items():
        assert abs(int(mask.sum()) - expected[name] * mask.numel()) <= 1
    uniform = initial_masks(model, sparsity, "uniform", dense=["features.conv1"], seed=3)
    assert bool(uniform["features.conv1"].all())
    assert sum(int((~mask).sum()) for mask in uniform.values()) == round(sparsity * total)
    rest = [name for name in shapes if name != "features.conv1"]
    density = (1 - sparsity - 150 / total) * total / (total - 150)
    assert all(abs(int(uniform[name].sum()) - density * uniform[name].numel()) <= 1 for name in rest)


def test_rigl_drops_the_smallest_weights_and_grows_where_the_gradient_is_largest():
    torch.manual_seed(0)
    layer = nn.Linear(10, 8)
    mask = torch.rand(8, 10) > 0.6
    prune.custom_from_mask(layer, "weight", mask)

    class Context:
        seed, total_steps = 0, 100

    evolve = _Evolve(Context(), type("P", (), {"zeta": 0.4})(), "gradient", delta_t=10, end=50)
    gradient = torch.randn(8, 10)
    evolve.gradients = {"fc": gradient}
    zeta = 0.4 / 2 * (1 + math.cos(math.pi * 20 / 50))
    assert evolve.zeta_at(20) == pytest.approx(zeta)
    with torch.no_grad():
        moved = evolve._move("fc", layer, zeta)
    active = int(mask.sum())
    count = round(zeta * active)
    weights = layer.weight_orig.detach().flatten()
    live = sorted(torch.nonzero(mask.flatten()).flatten().tolist(), key=lambda i: abs(float(weights[i])))
    kept = set(live[count:])  # brute force: drop the `count` smallest live weights ...
    candidates = [i for i in range(80) if i not in kept]
    grown = sorted(candidates, key=lambda i: -abs(float(gradient.flatten()[i])))[:count]  # ... grow the top |g|
    assert set(torch.nonzero(moved.flatten()).flatten().tolist()) == kept | set(grown)
    assert int(moved.sum()) == active


# ---------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("method, message", [
    ({"name": "gradual", "initial_sparsity": 1.0}, r"method\.initial_sparsity must be a sparsity in \[0, 1\)"),
    ({"name": "gradual", "start_epoch": -1}, r"method\.start_epoch must be a whole number of epochs >= 0"),
    ({"name": "gradual", "end_fraction": 0}, r"method\.end_fraction must be a fraction of the budget in \(0, 1\]"),
    ({"name": "gradual", "delta_t": 0}, r"method\.delta_t must be a whole number of steps >= 1"),
    ({"name": "gradual", "regrow": "yes"}, r"method\.regrow must be true or false"),
    ({"name": "set", "zeta": 0}, r"method\.zeta must be a fraction in \(0, 1\)"),
    ({"name": "rigl", "zeta": 1.0}, r"method\.zeta must be a fraction in \(0, 1\)"),
    ({"name": "rigl", "density": "dense"}, r"method\.density must be one of erk, uniform"),
    ({"name": "set", "delta_t": 2.5}, r"method\.delta_t must be a whole number of steps"),
    ({"name": "set", "end_fraction": 1.5}, r"method\.end_fraction must be a fraction of the budget"),
])
def test_bad_parameters_are_refused_naming_the_field(method, message):
    with pytest.raises(ExplorerError, match=message):
        recipe(method)


@pytest.mark.parametrize("method, plan, message", [
    ({"name": "gradual", "start_epoch": 2}, {}, r"method\.start_epoch 2 leaves no pruning phase"),
    ({"name": "gradual", "delta_t": 6}, {}, r"method\.delta_t must be at most the pruning phase, 5 steps"),
    ({"name": "gradual", "initial_sparsity": 0.9}, {}, r"method\.initial_sparsity must be at most the target"),
    ({"name": "set", "delta_t": 9}, {}, r"method\.delta_t must be at most the updating phase, 8 steps"),
    ({"name": "rigl"}, {"overrides": {"fc1": 0.5}}, r"remove plan\.overrides"),
    ({"name": "set"}, {"protect": ["fc9"]}, r"plan\.protect names fc9, which this model does not have"),
])
def test_settings_that_do_not_fit_the_budget_or_model_are_refused(digits, method, plan, message):
    with pytest.raises(ExplorerError, match=message):
        run_method(recipe(method, **plan), mlp(digits), digits)


@pytest.mark.parametrize("name", ["gradual", "set", "rigl"])
def test_channel_structure_is_refused_with_one_line(digits, name):
    with pytest.raises(ExplorerError, match=rf"Method '{name}' works with unstructured structure, not 'channel'"):
        run_method(recipe({"name": name}, structure="channel"), mlp(digits), digits)


@pytest.mark.parametrize("name", ["gradual", "rigl"])
def test_cancel_keeps_the_trajectory_so_far(digits, name):
    class CancelAfterSecondUpdate:
        def __init__(self):
            self.points = []

        def is_set(self):
            return len(updates(self.points)) >= 2

    flag = CancelAfterSecondUpdate()
    outcome = run_method(recipe({"name": name}, epochs=3), mlp(digits), digits, cancel=flag,
                         on_point=flag.points.append)
    assert outcome.cancelled and flag.points == outcome.trajectory
    assert [p["event"] for p in outcome.trajectory if p["event"] != "prune"][:2] == ["update", "update"]
    assert outcome.trajectory[-1]["step"] < 15 and not any(p["event"] == "epoch" for p in outcome.trajectory[3:])
    hooks = [hook for _, module in prunable_layers(outcome.model) for hook in module._forward_pre_hooks.values()]
    assert all(isinstance(hook, prune.BasePruningMethod) for hook in hooks)


@pytest.mark.parametrize("method", [{"name": "gradual", "regrow": True}, {"name": "set", "density": "uniform"},
                                    {"name": "rigl", "zeta": 0.5, "delta_t": 2}])
def test_a_recipe_runs_the_method_headless(tmp_path, capsys, method):
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "mlp", "data": "digits", "baseline": False},
                                    "scoring": {"structure": "unstructured", "criterion": "magnitude"},
                                    "plan": {"scope": "global", "sparsity": 0.8}, "method": method,
                                    "budget": {"epochs": 1}, "finetune": {"batch_size": 256}}))
    assert main(["run", "--recipe", str(path), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recipe"]["method"] == method
    events = [p["event"] for p in result["trajectory"]]
    assert "update" in events and events[-1] == "epoch"
    assert result["metrics"]["sparsity_actual"] == pytest.approx(result["trajectory"][-1]["sparsity"])
    # SET's new connections start at zero; those on always-zero inputs stay zero, so they read as pruned
    target = round(0.8 * UNITS) / UNITS
    highest = 0.82 if method["name"] == "set" else target + 1e-9
    assert target - 1e-9 <= result["metrics"]["sparsity_actual"] <= highest
