"""Methods in rounds: iterative pruning, learning-rate rewinding, lottery tickets (explorer/methods/rounds.py)."""
import json
import math

import pytest
import torch
import yaml

from explorer.cli import main
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.layers import effective_weight, prunable_layers
from explorer.masking import current_masks
from explorer.methods import MethodRun, run_method
from explorer.methods.rounds import split_budget
from explorer.models import build
from explorer.recipe import Recipe
from explorer.train import Callback, TrainConfig, lr_at, train

BATCH = 256
UNITS = 64 * 256 + 256 * 128 + 128 * 10  # prunable weights of the digits MLP


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def mlp(digits):
    torch.manual_seed(0)
    return build("mlp", digits.input_shape, digits.num_classes)


@pytest.fixture
def spy(monkeypatch):
    """Every ``ctx.train`` call: a copy of the model it starts from, its config and start step,
    and (global_step, lr) of each step it takes."""
    calls = []
    original = MethodRun.train

    class Rates(Callback):
        def __init__(self, seen):
            self.seen = seen

        def on_step_start(self, state):
            self.seen.append((state.global_step, state.lr))

    def recording_train(self, model, epochs, *, callbacks=(), config=None, start_step=0):
        call = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "masks": current_masks(model), "config": config, "start_step": start_step, "rates": []}
        calls.append(call)
        result = original(self, model, epochs, callbacks=[*callbacks, Rates(call["rates"])], config=config,
                          start_step=start_step)
        call["trained"] = {name: effective_weight(module).detach().clone()
                           for name, module in prunable_layers(result.model)}
        return result

    monkeypatch.setattr(MethodRun, "train", recording_train)
    return calls


def recipe(method: dict, epochs: int, *, sparsity=0.8, structure="unstructured", scope="global", **sections) -> Recipe:
    values = {"model": {"source": "mlp", "baseline": False}, "scoring": {"structure": structure},
              "plan": {"sparsity": sparsity, "scope": scope}, "method": method, "budget": {"epochs": epochs},
              "finetune": {"batch_size": BATCH}, "measure": {"latency": False}}
    values.update(sections)
    return Recipe.from_dict(values)


def closed_form(target: float, r: int, k: int) -> float:
    per_round = 1 - (1 - target) ** (1 / k)
    return 1 - (1 - per_round) ** r


def pruned_count(target_fraction: float) -> int:
    return round(target_fraction * UNITS)  # a global plan prunes exactly round(S * N) weights


def pruned_sets(masks: dict) -> set:
    return {(name, index) for name, mask in masks.items() for index in (~mask).flatten().nonzero().flatten().tolist()}


# ---------------------------------------------------------------------------------------------- iterative
def test_iterative_follows_the_closed_form_with_nested_cuts_and_splits_the_budget(digits, mlp, spy):
    outcome = run_method(recipe({"name": "iterative", "rounds": 3}, epochs=4), mlp, digits)
    assert split_budget(4, 3) == [1, 1, 2]
    assert [p["event"] for p in outcome.trajectory] == ["prune", "epoch", "prune", "epoch", "prune", "epoch", "epoch"]
    cuts = [p for p in outcome.trajectory if p["event"] == "prune"]
    for r, point in enumerate(cuts, start=1):
        assert point["sparsity"] == pytest.approx(pruned_count(closed_form(0.8, r, 3)) / UNITS, abs=1e-12)
    pruned = [pruned_sets(call["masks"]) for call in spy]
    assert [len(p) for p in pruned] == [pruned_count(closed_form(0.8, r, 3)) for r in (1, 2, 3)]
    assert pruned[0] < pruned[1] < pruned[2]  # each round keeps what the last one pruned
    final_zeros = sum(int((effective_weight(m) == 0).sum()) for _, m in prunable_layers(outcome.model))
    assert final_zeros == pruned_count(0.8) == round(0.8 * UNITS)
    assert outcome.trajectory[-1]["step"] == 4 * math.ceil(len(digits.y_train) / BATCH)


@pytest.mark.parametrize("name", ["iterative", "lr_rewinding"])
def test_channel_rounds_shrink_a_model_that_already_shrank(digits, mlp, name):
    outcome = run_method(recipe({"name": name, "rounds": 2}, epochs=2, sparsity=0.5, structure="channel",
                                scope="local"), mlp, digits)
    widths = [outcome.model.fc1.out_features, outcome.model.fc2.out_features]
    first = 1 - math.sqrt(0.5)  # round 1 of 2 at target 0.5
    kept_after_first = [n - round(first * n) for n in (256, 128)]
    assert all(abs(w - n / 2) <= 1 for w, n in zip(widths, (256, 128)))  # round 2 counts from the start model
    assert all(w < k for w, k in zip(widths, kept_after_first))
    cuts = [p["sparsity"] for p in outcome.trajectory if p["event"] == "prune"]
    assert len(cuts) == 2 and 0 < cuts[0] < cuts[1]


# ---------------------------------------------------------------------------------------------- lr rewinding
def test_lr_rewinding_replays_the_original_schedule_from_the_rewind_epoch(digits, mlp, spy):
    per_epoch = math.ceil(len(digits.y_train) / BATCH)
    run_method(recipe({"name": "lr_rewinding", "rewind_epoch": 1}, epochs=3), mlp, digits)
    original = TrainConfig(epochs=3, batch_size=BATCH)  # the recipe's settings over the budget
    (call,) = spy
    assert [step for step, _ in call["rates"]] == list(range(per_epoch, 3 * per_epoch))
    total = 3 * per_epoch
    for step, rate in call["rates"]:
        assert rate == lr_at(original, step, per_epoch)
        assert rate == pytest.approx(1e-3 * (1 + math.cos(math.pi * step / total)) / 2, rel=1e-12)

    spy.clear()
    run_method(recipe({"name": "one_shot"}, epochs=3), mlp, digits)
    (fine_tune,) = spy  # one_shot fine-tunes with its own schedule, from step 0
    assert fine_tune["rates"][0] == (0, 1e-3)
    assert call["rates"][0][1] < fine_tune["rates"][0][1]


def test_lr_rewinding_in_rounds_replays_each_rounds_share_and_cuts_like_iterative(digits, mlp, spy):
    per_epoch = math.ceil(len(digits.y_train) / BATCH)
    outcome = run_method(recipe({"name": "lr_rewinding", "rewind_epoch": 1, "rounds": 2}, epochs=5), mlp, digits)
    assert [call["config"].epochs for call in spy] == split_budget(5, 2) == [2, 3]
    for call in spy:
        steps = [step for step, _ in call["rates"]]
        assert steps == list(range(per_epoch, call["config"].epochs * per_epoch))
        assert all(rate == lr_at(TrainConfig(epochs=call["config"].epochs, batch_size=BATCH), step, per_epoch)
                   for step, rate in call["rates"])
    cuts = [p for p in outcome.trajectory if p["event"] == "prune"]
    assert [c["sparsity"] for c in cuts] == pytest.approx([pruned_count(closed_form(0.8, r, 2)) / UNITS for r in (1, 2)])
    assert [c["lr"] for c in cuts] == [lr_at(TrainConfig(epochs=e, batch_size=BATCH), per_epoch, per_epoch)
                                       for e in (2, 3)]
    assert outcome.trajectory[-1]["epoch"] == 5 - 2 * 1  # the budget minus rounds x rewind_epoch


# ---------------------------------------------------------------------------------------------- lottery ticket
def fresh(digits, seed):
    model = build("mlp", digits.input_shape, digits.num_classes)
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


class StopAfter(Callback):
    def __init__(self, steps):
        self.steps = steps

    def on_step_end(self, state):
        state.stop = state.global_step + 1 >= self.steps


def test_lottery_ticket_rewinds_survivors_to_the_snapshot_and_prunes_by_magnitude(digits, mlp, spy):
    rewind_step = 3
    outcome = run_method(recipe({"name": "lottery_ticket", "rounds": 3, "rewind_step": rewind_step}, epochs=3),
                         mlp, digits)
    events = [p["event"] for p in outcome.trajectory]
    assert events == ["epoch", "prune", "rewind", "epoch", "prune", "rewind", "epoch"]
    # The snapshot, computed independently: the same fresh weights trained for rewind_step steps.
    snapshot = train(fresh(digits, 0), digits, TrainConfig(epochs=1, batch_size=BATCH),
                     callbacks=[StopAfter(rewind_step)]).model.state_dict()
    assert spy[0]["masks"] == {} and all(torch.equal(spy[0]["model"][k], v) for k, v in fresh(digits, 0).state_dict().items())
    for cut, call in enumerate(spy[1:], start=1):
        masks = call["masks"]
        assert sum(int((~m).sum()) for m in masks.values()) == pruned_count(closed_form(0.8, cut, 2))
        for name, mask in masks.items():
            weight = call["model"][f"{name}.weight_orig"] * call["model"][f"{name}.weight_mask"]
            assert torch.equal(weight[mask], snapshot[f"{name}.weight"][mask])  # survivors: the snapshot exactly
            assert not weight[~mask].any()  # pruned: zero
            assert torch.equal(call["model"][f"{name}.bias"], snapshot[f"{name}.bias"])
        # Pruned by magnitude: the kept weights are the largest |w| the round before trained.
        trained = spy[cut - 1]["trained"]
        magnitudes = torch.cat([trained[name].abs().flatten() for name in masks])
        kept = torch.cat([masks[name].flatten() for name in masks])
        assert magnitudes[kept].min() >= magnitudes[~kept].max()
    assert outcome.trajectory[-1]["sparsity"] == pytest.approx(pruned_count(0.8) / UNITS, abs=1e-12)


def test_lottery_ticket_reinit_keeps_the_mask_but_draws_fresh_weights(digits, mlp, spy):
    run_method(recipe({"name": "lottery_ticket", "rounds": 2}, epochs=2), mlp, digits)
    ticket = spy[-1]
    spy.clear()
    outcome = run_method(recipe({"name": "lottery_ticket", "rounds": 2, "reinit": True}, epochs=2), mlp, digits)
    control = spy[-1]
    assert [p["event"] for p in outcome.trajectory] == ["epoch", "prune", "reinit", "epoch"]
    assert control["masks"].keys() == ticket["masks"].keys()
    assert all(torch.equal(control["masks"][name], ticket["masks"][name]) for name in ticket["masks"])
    init, redraw = fresh(digits, 0).state_dict(), fresh(digits, 1).state_dict()  # rewind_step 0: the init
    for name, mask in control["masks"].items():
        weight = control["model"][f"{name}.weight_orig"] * mask
        assert torch.equal(ticket["model"][f"{name}.weight_orig"][mask], init[f"{name}.weight"][mask])
        assert not torch.allclose(weight[mask], init[f"{name}.weight"][mask])  # not the snapshot
        assert torch.equal(weight[mask], redraw[f"{name}.weight"][mask]) and not weight[~mask].any()


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method, match", [
    ({"name": "iterative", "rounds": 0}, r"method\.rounds must be an integer >= 1, got 0"),
    ({"name": "iterative", "rounds": True}, r"method\.rounds must be an integer >= 1"),
    ({"name": "lr_rewinding", "rewind_epoch": -1}, r"method\.rewind_epoch must be an integer >= 0, got -1"),
    ({"name": "lottery_ticket", "rounds": 1}, r"method\.rounds must be an integer >= 2, got 1"),
    ({"name": "lottery_ticket", "reinit": "yes"}, r"method\.reinit must be true or false"),
    ({"name": "lottery_ticket", "rewind": 3}, r"unknown setting\(s\) rewind in 'method'"),
])
def test_bad_params_are_refused_naming_the_field(method, match):
    with pytest.raises(ExplorerError, match=match):
        recipe(method, epochs=2)


@pytest.mark.parametrize("method, epochs, match", [
    ({"name": "lr_rewinding", "rewind_epoch": 2}, 2, r"method\.rewind_epoch must be below the budget \(2 epochs\)"),
    ({"name": "lr_rewinding", "rewind_epoch": 1, "rounds": 2}, 3, r"rewind_epoch must be below each round's schedule"),
    ({"name": "lottery_ticket", "rounds": 2, "rewind_step": 5}, 2,
     r"method\.rewind_step must lie within the first round's training, 0 to 4 \(1 epochs x 5 steps\), got 5"),
    ({"name": "iterative", "rounds": 4}, 3, r"method\.rounds 4 needs budget\.epochs >= 4, got 3"),
])
def test_settings_past_the_budget_are_refused_before_training(digits, mlp, spy, method, epochs, match):
    with pytest.raises(ExplorerError, match=match):
        run_method(recipe(method, epochs=epochs), mlp, digits)
    assert spy == []


def test_lottery_ticket_refuses_channels_and_other_criteria(digits, mlp):
    with pytest.raises(ExplorerError, match=r"^Method 'lottery_ticket' works with unstructured structure, not 'channel'"):
        run_method(recipe({"name": "lottery_ticket"}, epochs=3, structure="channel"), mlp, digits)
    with pytest.raises(ExplorerError, match=r"prunes by weight magnitude, not 'random'"):
        run_method(recipe({"name": "lottery_ticket"}, epochs=3, scoring={"criterion": "random"}), mlp, digits)


# ---------------------------------------------------------------------------------------------- cancel and CLI
@pytest.mark.parametrize("method, events", [
    ({"name": "iterative", "rounds": 2}, ["prune", "epoch"]),
    ({"name": "lr_rewinding", "rounds": 2}, ["prune", "epoch"]),
    ({"name": "lottery_ticket", "rounds": 2}, ["epoch"]),
])
def test_cancel_between_rounds_keeps_the_trajectory_so_far(digits, mlp, method, events):
    class CancelAfterFirstEpoch:
        def __init__(self):
            self.points = []

        def is_set(self):
            return any(p["event"] == "epoch" for p in self.points)

    flag = CancelAfterFirstEpoch()
    outcome = run_method(recipe(method, epochs=4), mlp, digits, cancel=flag, on_point=flag.points.append)
    assert outcome.cancelled and [p["event"] for p in outcome.trajectory] == events
    assert flag.points == outcome.trajectory


@pytest.mark.parametrize("method, events", [
    ({"name": "iterative", "rounds": 2}, ["prune", "epoch", "prune", "epoch"]),
    ({"name": "lr_rewinding", "rewind_epoch": 1}, ["prune", "epoch"]),
    ({"name": "lottery_ticket", "rounds": 2, "rewind_step": 2}, ["epoch", "prune", "rewind", "epoch"]),
])
def test_a_recipe_runs_each_method_headless(tmp_path, capsys, method, events):
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "mlp", "data": "digits", "baseline": False},
                                    "structure": "unstructured", "criterion": "magnitude", "scope": "local",
                                    "sparsity": 0.9, "method": method, "budget": {"epochs": 2},
                                    "finetune": {"batch_size": BATCH}}))
    assert main(["run", "--recipe", str(path), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recipe"]["method"] == method
    assert [p["event"] for p in result["trajectory"]] == events
    layers = (64 * 256, 256 * 128, 128 * 10)  # local scope: round(0.9 * n) in every layer
    assert result["metrics"]["sparsity_actual"] == pytest.approx(sum(round(0.9 * n) for n in layers) / UNITS, abs=1e-12)
