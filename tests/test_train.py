import math
import threading

import pytest
import torch
from torch import nn

from explorer.baselines import baseline, cache_key, default_config
from explorer.data import Dataset, load_dataset, shapes
from explorer.errors import ExplorerError
from explorer.models import build
from explorer.layers import available_devices, choose_device
from explorer.train import Callback, TrainConfig, evaluate, lr_at, start_training, steps_per_epoch, train


def test_training_lowers_loss_and_beats_chance_without_touching_the_input_model():
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build("mlp", data.input_shape, data.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = evaluate(model, data, "val")
    seen = []
    result = train(model, data, TrainConfig(epochs=2, lr=2e-3, batch_size=32), progress=seen.append)
    end = evaluate(result.model, data, "val")
    assert end["loss"] < start["loss"]
    assert end["accuracy"] > 0.5 > 1 / data.num_classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.epochs_done == 2 and len(result.history) == 2 and not result.cancelled
    assert seen[-1].metric is not None and seen[-1].fraction == 1.0


def test_evaluate_matches_a_manual_count():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes).eval()
    with torch.no_grad():
        manual = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert evaluate(model, data, "test")["accuracy"] == pytest.approx(manual)


def test_training_is_deterministic_under_a_seed():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)
    config = TrainConfig(epochs=1, batch_size=64, seed=5)
    a, b = train(model, data, config), train(model, data, config)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_cancel_keeps_the_partial_model():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)
    flag = threading.Event()

    def stop_after_three(progress):
        if progress.step == 3:
            flag.set()

    result = train(model, data, TrainConfig(epochs=3), progress=stop_after_three, cancel=flag)
    assert result.cancelled and result.steps == 3 and result.epochs_done == 0
    assert not torch.equal(result.model.classifier.weight, model.classifier.weight)


def test_bad_configs_and_divergence():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)
    with pytest.raises(ExplorerError, match="optimizer"):
        train(model, data, TrainConfig(optimizer="lbfgs"))
    with pytest.raises(ExplorerError, match="'lr' must be a positive learning rate, got -1"):
        train(model, data, TrainConfig(lr=-1))
    with pytest.raises(ExplorerError, match="diverged"):
        train(model, data, TrainConfig(epochs=1, lr=1e30, optimizer="sgd"))


def test_device_choice(monkeypatch):
    assert available_devices()[-1] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto").type == "cuda"
    assert choose_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto").type in ("cpu", "mps")
    with pytest.raises(ExplorerError, match="not available"):
        choose_device("cuda")


def test_masked_weights_stay_zero_during_training():
    import torch.nn.utils.prune as prune
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)
    prune.l1_unstructured(model.fc1, "weight", amount=0.7)
    zeros = int((model.fc1.weight == 0).sum())
    result = train(model, data, TrainConfig(epochs=1))
    assert int((result.model.fc1.weight == 0).sum()) == zeros


def test_baseline_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path))
    data = shapes(seed=0, num_samples=400)
    config = TrainConfig(epochs=1, batch_size=64)
    first = baseline("lenet5", data, config=config)
    second = baseline("lenet5", data, config=config)
    assert not first.from_cache and second.from_cache
    assert second.accuracy == pytest.approx(first.accuracy)
    x = data.x_test[:4]
    assert torch.allclose(first.model(x), second.model(x))
    assert cache_key("lenet5", "shapes", config) != cache_key("lenet5", "shapes", TrainConfig(epochs=2))
    assert default_config("resnet20", "shapes", seed=3).seed == 3


# --- learning-rate schedules: a pure function of the step, checked against torch's schedulers ---

def _torch_lrs(config: TrainConfig, per_epoch: int, make_scheduler, *, per_step: bool = True) -> list[float]:
    """The rates torch's own scheduler gives, stepped side by side with the run (per step or per epoch)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for epoch in range(config.epochs):
        for _ in range(per_epoch):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_step and len(rates) < config.epochs * per_epoch:  # OneCycleLR refuses a step past the run
                scheduler.step()
        if not per_step:
            scheduler.step()
    return rates


def _ours(config: TrainConfig, per_epoch: int) -> list[float]:
    return [lr_at(config, step, per_epoch) for step in range(config.epochs * per_epoch)]


def test_constant_and_step_schedules():
    config = TrainConfig(epochs=7, lr=0.1, schedule="step", step_epochs=2, gamma=0.5)
    expected = _torch_lrs(config, 3, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
                          per_step=False)
    assert _ours(config, 3) == pytest.approx(expected, rel=1e-12)
    assert _ours(config, 3)[-1] == pytest.approx(0.1 * 0.5 ** 3)  # epoch 7 is past three drops
    assert set(_ours(TrainConfig(epochs=3, lr=0.02, schedule="constant"), 4)) == {0.02}


def test_cosine_schedule_matches_closed_form_and_torch():
    config = TrainConfig(epochs=4, lr=0.3, schedule="cosine")
    per_epoch, total = 5, 20
    expected = _torch_lrs(config, per_epoch, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total))
    ours = _ours(config, per_epoch)
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours[0] == 0.3 and ours[total // 2] == pytest.approx(0.15)
    assert ours[-1] == pytest.approx(0.3 * (1 + math.cos(math.pi * (total - 1) / total)) / 2)


@pytest.mark.parametrize("anneal, warmup", [("cos", 0.3), ("linear", 0.25), ("cos", 0.0), ("linear", 1.0)])
def test_one_cycle_matches_torch(anneal, warmup):
    config = TrainConfig(epochs=6, lr=0.4, schedule="one_cycle", warmup_fraction=warmup, anneal=anneal,
                         div_factor=10.0, final_div_factor=100.0)
    per_epoch = 7
    expected = _torch_lrs(config, per_epoch, lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.4, total_steps=42, pct_start=warmup, anneal_strategy=anneal, div_factor=10.0,
        final_div_factor=100.0, cycle_momentum=False))
    assert _ours(config, per_epoch) == pytest.approx(expected, rel=1e-12)


def test_one_cycle_shape():
    config = TrainConfig(epochs=1, lr=1.0, schedule="one_cycle", warmup_fraction=0.5, anneal="linear",
                         div_factor=4.0, final_div_factor=2.0)
    ours = _ours(config, 11)  # from 1/4 up to 1 until step 0.5 * 11 - 1 = 4.5, then down to 1/8 at step 10
    assert ours[0] == 0.25 and ours[4] == pytest.approx(0.25 + 0.75 * 4 / 4.5)
    assert ours[5] == pytest.approx(1.0 - 0.875 * 0.5 / 5.5) and ours[-1] == pytest.approx(0.125)
    assert ours == sorted(ours[:5]) + sorted(ours[5:], reverse=True)


def test_bad_schedule_settings_name_the_field_and_the_choices():
    with pytest.raises(ExplorerError, match="'schedule' must be one of constant, step, cosine, one_cycle, got 'linear'"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(ExplorerError, match="'gamma' must be a factor in"):
        TrainConfig(gamma=0.0).validate()
    with pytest.raises(ExplorerError, match="'warmup_fraction' must be a fraction in \\[0, 1\\]"):
        TrainConfig(warmup_fraction=1.5).validate()
    with pytest.raises(ExplorerError, match="'anneal' must be one of cos, linear"):
        TrainConfig(anneal="cubic").validate()
    with pytest.raises(ExplorerError, match="'lr'.*got '1e-3'"):  # what YAML 1.1 makes of `lr: 1e-3`
        TrainConfig(lr="1e-3").validate()
    with pytest.raises(ExplorerError, match="'step_epochs' must be a whole number from 1 to 1,000"):
        TrainConfig(step_epochs=0).validate()
    with pytest.raises(ExplorerError, match="outside the schedule: 1 epochs of 10 steps make 10 steps"):
        lr_at(TrainConfig(epochs=1), 10, 10)
    with pytest.raises(ExplorerError, match="outside the schedule"):
        lr_at(TrainConfig(epochs=0), 0, 10)


def test_config_is_plain_data_with_its_old_defaults():
    config = TrainConfig(schedule="one_cycle", warmup_fraction=0.1)
    assert TrainConfig(**config.to_dict()) == config
    assert (TrainConfig().epochs, TrainConfig().lr, TrainConfig().batch_size, TrainConfig().optimizer,
            TrainConfig().schedule) == (5, 1e-3, 64, "adam", "cosine")


# --- callbacks ---

def tiny_dataset(samples: int = 40, features: int = 3) -> Dataset:
    """Two linearly separable classes in a few dimensions: fast enough to count every step."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    y = (x[:, 0] > 0).long()
    return Dataset(name="tiny", input_shape=(features,), num_classes=2, class_names=("neg", "pos"),
                   x_train=x, y_train=y, x_val=x[:8], y_val=y[:8], x_test=x[:8], y_test=y[:8])


class Recorder(Callback):
    """Logs every call as (name, hook, global step or epoch) and what the step saw."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.lrs, self.labels, self.weights, self.grads = name, log, [], [], [], []

    def on_step_start(self, state):
        self.log.append((self.name, "start", state.global_step))
        self.weights.append(state.model.weight.detach().clone())
        self.labels.append(state.y.clone())

    def penalty(self, state):
        self.log.append((self.name, "penalty", state.global_step))

    def on_step_end(self, state):
        self.log.append((self.name, "end", state.global_step))
        self.lrs.append((state.global_step, state.lr, state.optimizer.param_groups[0]["lr"]))
        self.grads.append(state.model.weight.grad.detach().clone())

    def on_epoch_end(self, state):
        self.log.append((self.name, "epoch", state.epoch))


def test_callbacks_are_called_in_order_and_count():
    data, config = tiny_dataset(), TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.1)
    log: list = []
    torch.manual_seed(0)
    result = train(nn.Linear(3, 2), data, config, callbacks=[Recorder("a", log), Recorder("b", log)])
    per_epoch = math.ceil(40 / 16)
    expected = []
    for epoch in range(2):
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            expected += [(n, hook, step) for hook in ("start", "penalty", "end") for n in "ab"]
        expected += [("a", "epoch", epoch + 1), ("b", "epoch", epoch + 1)]
    assert log == expected
    assert result.steps == 2 * per_epoch and result.epochs_done == 2 and not result.stopped


def test_an_l1_penalty_adds_lambda_sign_w_to_the_gradient():
    data, config = tiny_dataset(), TrainConfig(epochs=1, batch_size=40, optimizer="sgd", lr=0.1)
    strength = 0.05

    class L1(Callback):
        def penalty(self, state):
            return strength * state.model.weight.abs().sum()

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = 0.0  # |w| has gradient 0 at 0
    plain, penalised = Recorder("plain", []), Recorder("l1", [])
    train(model, data, config, callbacks=[plain])
    train(model, data, config, callbacks=[L1(), penalised])
    assert torch.equal(plain.weights[0], penalised.weights[0])
    added = penalised.grads[0] - plain.grads[0]
    assert torch.allclose(added, strength * torch.sign(model.weight.detach()), atol=1e-7)
    assert added[0, 0] == 0


def test_restarting_at_step_k_replays_the_tail_of_the_schedule():
    data = tiny_dataset()
    config = TrainConfig(epochs=4, batch_size=16, optimizer="sgd", lr=0.1, schedule="one_cycle")
    per_epoch = steps_per_epoch(data, config)
    full, rewound = Recorder("full", []), Recorder("rewound", [])
    train(nn.Linear(3, 2), data, config, callbacks=[full])
    k = per_epoch + 1  # mid-way through epoch 2
    result = train(nn.Linear(3, 2), data, config, callbacks=[rewound], start_step=k)
    assert rewound.lrs == full.lrs[k:]  # exactly, not approximately
    assert [step for step, lr, used in rewound.lrs] == list(range(k, 4 * per_epoch))
    assert all(lr == used for _, lr, used in full.lrs)  # the optimiser ran at the scheduled rate
    assert all(torch.equal(a, b) for a, b in zip(rewound.labels, full.labels[k:]))  # same batches too
    assert result.steps == 4 * per_epoch - k and result.epochs_done == 3
    with pytest.raises(ExplorerError, match="start_step"):
        train(nn.Linear(3, 2), data, config, start_step=4 * per_epoch + 1)


def test_a_callback_can_stop_training_mid_epoch_or_at_an_epoch_end():
    data, config = tiny_dataset(), TrainConfig(epochs=5, batch_size=8)

    class StopAt(Callback):
        def __init__(self, step=None, epoch=None):
            self.stop_step, self.stop_epoch = step, epoch

        def on_step_end(self, state):
            state.stop = state.global_step == self.stop_step

        def on_epoch_end(self, state):
            state.stop = state.epoch == self.stop_epoch

    mid = train(nn.Linear(3, 2), data, config, callbacks=[StopAt(step=2)])
    assert mid.stopped and not mid.cancelled and mid.steps == 3 and mid.epochs_done == 0
    assert [row["partial"] for row in mid.history] == [True]
    at_epoch = train(nn.Linear(3, 2), data, config, callbacks=[StopAt(epoch=2)])
    assert at_epoch.stopped and at_epoch.steps == 2 * 5 and at_epoch.epochs_done == 2


def test_start_training_runs_in_the_background_with_a_live_curve():
    data = tiny_dataset()
    job = start_training(nn.Linear(3, 2), data, TrainConfig(epochs=2, batch_size=16), name="Tiny training",
                         meta={"source": "test"})
    assert job.wait(timeout=60), job.status
    assert job.error is None and job.result.epochs_done == 2 and job.fraction == 1.0
    points = job.payload()
    assert [step for step, _ in points["step_loss"]] == list(range(1, 7))
    assert [step for step, _ in points["val_accuracy"]] == [3, 6]
    assert [accuracy for _, accuracy in points["val_accuracy"]] == [row["val_accuracy"] for row in job.result.history]
    assert job.meta == {"source": "test"}
