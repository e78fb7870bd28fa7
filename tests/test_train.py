import threading

import pytest
import torch

from explorer.baselines import baseline, cache_key, default_config
from explorer.data import load_dataset, shapes
from explorer.errors import ExplorerError
from explorer.models import build
from explorer.layers import available_devices, choose_device
from explorer.train import TrainConfig, evaluate, train


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
    with pytest.raises(ExplorerError, match="Learning rate"):
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
