"""Measurement: checked against textbook formulas and direct counts, not against itself."""
import copy
import statistics
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from explorer import measure


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_conv_flops_match_textbook_formula():
    conv = nn.Conv2d(3, 16, 5, padding=2)
    result = measure.flops(conv, torch.randn(2, 3, 12, 10))
    assert result["dense"] == 2 * (2 * 16 * 3 * 5 * 5 * 12 * 10)  # batch 2, 2 FLOPs per MAC
    assert result["effective"] == result["dense"]


def test_strided_and_linear_flops_per_layer():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 7 * 7, 5))
    result = measure.flops(model, torch.randn(1, 4, 16, 16))
    assert result["per_layer"]["0"]["dense"] == 2 * 8 * 4 * 3 * 3 * 7 * 7
    assert result["per_layer"]["2"]["dense"] == 2 * 8 * 7 * 7 * 5
    assert result["dense"] == sum(layer["dense"] for layer in result["per_layer"].values())


def test_masked_model_counts_zeros_and_effective_flops():
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.75)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    counts = measure.count_params(model)
    assert counts["total"] == 64 * 128 + 128 + 128 * 10 + 10
    nonzero = int((model[0].weight != 0).sum() + (model[2].weight != 0).sum()
                  + (model[0].bias != 0).sum() + (model[2].bias != 0).sum())
    assert counts["nonzero"] == nonzero
    assert counts["nonzero"] <= counts["total"] - int(0.75 * 64 * 128) - 640

    result = measure.flops(model, torch.randn(4, 64))
    first_dense = 2 * 4 * 64 * 128
    density = float((model[0].weight != 0).sum()) / model[0].weight.numel()
    assert result["per_layer"]["0"]["dense"] == first_dense
    assert result["per_layer"]["0"]["effective"] == round(first_dense * density)
    assert result["effective"] == sum(layer["effective"] for layer in result["per_layer"].values())
    assert result["effective"] < 0.45 * result["dense"]


def test_zeroed_dense_weights_count_like_masks():
    masked, zeroed = _mlp(), _mlp()
    prune.l1_unstructured(masked[0], "weight", amount=0.5)
    with torch.no_grad():
        zeroed[0].weight.copy_(masked[0].weight)
    assert measure.count_params(masked) == measure.count_params(zeroed)
    assert measure.flops(masked, torch.randn(1, 64)) == measure.flops(zeroed, torch.randn(1, 64))


def test_compressed_size_rewards_unstructured_zeros_not_raw():
    dense = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    sparse = copy.deepcopy(dense)
    for layer in sparse:
        prune.random_unstructured(layer, "weight", amount=0.9)
    dense_size, sparse_size = measure.compressed_size_bytes(dense), measure.compressed_size_bytes(sparse)
    assert abs(sparse_size["raw"] - dense_size["raw"]) < 0.01 * dense_size["raw"], "masks are not saved"
    assert sparse_size["compressed"] < 0.35 * dense_size["compressed"]
    assert dense_size["compressed"] > 0.8 * dense_size["raw"], "random floats barely compress"
    assert dense_size["raw"] > 4 * 2 * 256 * 256


def test_latency_fields_are_sane():
    model = _small_cnn()
    model.train()
    result = measure.latency(model, torch.randn(2, 3, 16, 16), threads=1, min_run_time=0.05)
    assert set(result) >= {"median_ms", "iqr_ms", "device", "batch", "threads"}
    assert result["median_ms"] > 0 and result["iqr_ms"] >= 0
    assert (result["device"], result["batch"], result["threads"]) == ("cpu", 2, 1)
    assert model.training, "measurement restores the model's mode"


def test_compare_latency_reports_both_and_speedup():
    big, small = _small_cnn(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    result = measure.compare_latency(big, small, torch.randn(1, 3, 16, 16), threads=1, min_run_time=0.1)
    assert result["dense"]["threads"] == result["pruned"]["threads"] == 1
    ratios = sorted(dense / pruned for dense, pruned in result["pairs_ms"])
    assert result["speedup_measured"] == pytest.approx(statistics.median(ratios), rel=1e-4)
    low, high = result["speedup_interval"]
    assert ratios[0] <= low <= result["speedup_measured"] <= high <= ratios[-1]


def test_peak_memory_on_cpu_is_an_estimate_of_params_and_activations():
    model = _small_cnn()
    example = torch.randn(2, 3, 16, 16)
    result = measure.peak_memory_bytes(model, example)
    assert result["method"] == "estimate_params_plus_activations" and result["device"] == "cpu"
    params_bytes = 4 * sum(t.numel() for t in model.state_dict().values())
    conv_outputs_bytes = 4 * 2 * (16 + 32) * 16 * 16
    assert result["bytes"] >= params_bytes + example.numel() * 4 + conv_outputs_bytes


def test_report_side_by_side_with_baseline():
    baseline = _small_cnn()
    masked = copy.deepcopy(baseline)
    for layer in (masked[0], masked[3], masked[7]):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    example = torch.randn(1, 3, 16, 16)
    metrics = measure.report(masked, example, baseline=baseline, threads=1, min_run_time=0.1)
    assert metrics.params_total == measure.count_params(baseline)["total"] == metrics.baseline_params_total
    assert metrics.speedup_flops == pytest.approx(2.0, rel=0.02)
    assert metrics.speedup_measured > 0 and metrics.latency_ms > 0 and metrics.threads == 1
    assert metrics.size_compressed_bytes < metrics.baseline_size_compressed_bytes
    json.dumps(metrics.to_dict())

    alone = measure.report(baseline, example, latency=False)
    assert alone.latency_ms is None and alone.speedup_flops is None
    assert alone.flops_dense == alone.flops_effective


def test_remembered_recomputes_after_an_in_place_edit_and_only_then():
    model = _mlp()
    calls = []

    def count():
        calls.append(1)
        return measure.count_params(model)

    first = measure.remembered(model, ("params",), count)
    assert measure.remembered(model, ("params",), count) == first and len(calls) == 1
    with torch.no_grad():
        model[0].weight[0].zero_()  # bumps the version counter
    second = measure.remembered(model, ("params",), count)
    assert len(calls) == 2 and second["nonzero"] == first["nonzero"] - 64
    assert measure.remembered(_mlp(), ("params",), lambda: {"other": 1}) == {"other": 1}  # a new object, no hit


def test_report_measures_the_base_once_for_several_pruned_copies(monkeypatch):
    base = _mlp()
    sizes = []
    original = measure.compressed_size_bytes
    monkeypatch.setattr(measure, "compressed_size_bytes", lambda m, **kw: sizes.append(m) or original(m, **kw))
    x = torch.randn(8, 64)
    for amount in (0.3, 0.6):
        pruned = copy.deepcopy(base)
        prune.l1_unstructured(pruned[0], "weight", amount=amount)
        metrics = measure.report(pruned, x, baseline=base, latency=False)
        assert metrics.baseline_size_compressed_bytes == original(base)["compressed"]
    assert sum(1 for m in sizes if m is base) == 1


def test_file_size_bytes_equals_deflating_the_whole_file_at_once(tmp_path):
    import zlib
    data = torch.randn(400_000).numpy().tobytes() + bytes(1_500_000)  # > 1 MiB: several chunks, one boundary mid-run
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    assert measure.file_size_bytes(path) == {"raw": len(data), "compressed": len(zlib.compress(data, 6))}
