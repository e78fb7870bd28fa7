import numpy as np
import pytest
import torch

from explorer import stats
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.models import build


def test_weight_stats_match_numpy():
    model = build("lenet5", (1, 8, 8), 10)
    summary = stats.weight_stats(model, bins=10)
    w = model.features.conv2.weight.detach().numpy().ravel()
    layer = summary["features.conv2"]
    assert layer["count"] == w.size and layer["shape"] == [16, 6, 5, 5]
    assert layer["mean"] == pytest.approx(w.mean(), abs=1e-6)
    assert layer["std"] == pytest.approx(w.std(ddof=1), rel=1e-4)
    assert layer["mean_abs"] == pytest.approx(np.abs(w).mean(), rel=1e-5)
    counts, edges = np.histogram(w, bins=10, range=(w.min(), w.max()))
    assert layer["hist"]["counts"] == counts.tolist()
    assert layer["hist"]["edges"] == pytest.approx(edges.tolist(), abs=1e-6)


def test_shared_range_and_zero_fraction_of_masked_weights():
    import torch.nn.utils.prune as prune
    model = build("mlp", (1, 8, 8), 10)
    prune.l1_unstructured(model.fc1, "weight", amount=0.25)
    summary = stats.weight_stats(model, shared_range=True)
    assert summary["fc1"]["zeros_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert summary["fc1"]["hist"]["edges"][0] == summary["classifier"]["hist"]["edges"][0]


def test_gradient_stats_equal_a_manual_mean_gradient():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)
    calib = data.calibration(2, 16)
    summary = stats.gradient_stats(model, calib)
    grads = []
    for x, y in calib:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model.fc2.weight.grad.clone())
    manual = torch.stack(grads).mean(0)
    assert summary["fc2"]["mean_abs"] == pytest.approx(float(manual.abs().mean()), rel=1e-4)
    with pytest.raises(ExplorerError):
        stats.gradient_stats(model, [])


def test_layer_table_counts_flops_of_a_conv():
    model = build("lenet5", (1, 8, 8), 10)
    rows = {r["name"]: r for r in stats.layer_table(model, torch.zeros(1, 1, 8, 8))}
    conv = rows["features.conv1"]
    assert conv["params"] == 6 * 25 + 6 and conv["prunable"]
    assert conv["flops"] == 2 * 6 * 1 * 5 * 5 * 8 * 8


def test_nan_weights_are_reported():
    model = build("mlp", (1, 8, 8), 10)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ExplorerError, match="NaN"):
        stats.weight_stats(model)
