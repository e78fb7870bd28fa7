"""CSR kernels and int8: outputs against torch's dense layers, sizes against the files, accuracy against torch."""
import os

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from explorer import tasks
from explorer.data import load_dataset
from explorer.deploy import quantize, sparse
from explorer.errors import ExplorerError
from explorer.zoo import build


def test_csr_linear_computes_what_linear_does_on_any_leading_shape():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.8)
    csr = sparse.CsrLinear(linear)
    assert csr.weight.layout == torch.sparse_csr and "sparsity=" in repr(csr)
    for shape in ((5, 32), (2, 3, 32), (1, 32)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(csr(x), linear(x), atol=1e-5)
    no_bias = nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(sparse.CsrLinear(no_bias)(x), no_bias(x), atol=1e-5)


def test_break_even_point_is_where_every_higher_sparsity_wins():
    rows = [{"sparsity": s, "speedup": v} for s, v in ((0.5, 0.3), (0.8, 1.1), (0.9, 0.95), (0.95, 1.4), (0.99, 3.0))]
    assert sparse.break_even_point(rows) == 0.95  # 0.8 wins but 0.9 does not: not yet break-even
    assert sparse.break_even_point([{"sparsity": 0.99, "speedup": 0.9}]) is None
    assert sparse.break_even_point([{"sparsity": 0.5, "speedup": 1.2}, {"sparsity": 0.9, "speedup": 2}]) == 0.5


def test_break_even_times_each_sparsity_with_an_interval():
    result = sparse.break_even((64, 128), batch=2, sparsities=(0.5, 0.99), max_run_time=0.05)
    assert result["shape"] == [64, 128] and result["batch"] == 2 and result["threads"] >= 1
    assert [row["sparsity"] for row in result["rows"]] == [0.5, 0.99]
    for row in result["rows"]:
        assert row["speedup_interval"][0] <= row["speedup"] <= row["speedup_interval"][1]
    assert result["break_even"] == sparse.break_even_point(result["rows"])


def test_sparsify_swaps_exactly_the_layers_it_says_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = build("mlp", (64,), 10).eval()
    prune.l1_unstructured(model.fc1, "weight", 0.98)
    x = torch.randn(3, 64)
    result = sparse.end_to_end(model, x, max_run_time=0.2)
    layers = {row["name"]: row for row in result["layers"]}
    assert list(layers) == ["fc1", "fc2", "classifier"]
    assert layers["fc1"]["sparsity"] == pytest.approx(0.98, abs=1e-3) and layers["fc2"]["sparsity"] == 0
    swapped, _ = sparse.sparsify(model, x, max_run_time=0.05)
    for row in sparse.sparsify(model, x, max_run_time=0.05)[1]:
        assert row["sparse"] == (row["speedup"] > 1)
    kinds = {name: type(m) for name, m in swapped.named_modules() if name in layers}
    assert all(kind in (nn.Linear, sparse.CsrLinear) for kind in kinds.values())
    with torch.no_grad():
        assert torch.allclose(swapped(x), model(x), atol=1e-5)
    assert result["max_abs_diff"] <= 1e-5 and result["batch"] == 3
    assert result["speedup_interval"][0] <= result["speedup"] <= result["speedup_interval"][1]


def test_int8_next_to_fp32_files_sizes_and_accuracy_from_the_files(tmp_path):
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    dense = build("mlp", dataset.input_shape, dataset.num_classes).eval()
    pruned = build("mlp", dataset.input_shape, dataset.num_classes).eval()
    pruned.load_state_dict(dense.state_dict())
    for module in (pruned.fc1, pruned.fc2):
        prune.l1_unstructured(module, "weight", 0.5)
    result = quantize.compare(dense, pruned, dataset, batch=8, max_run_time=0.2, folder=tmp_path)
    rows = {row["model"]: row for row in result["rows"]}
    assert list(rows) == ["dense fp32", "pruned fp32", "pruned int8"] and result["task"] == "accuracy"
    for row in rows.values():
        assert row["size_bytes"] == os.path.getsize(row["path"])
        assert row["size_vs_dense"] == pytest.approx(row["size_bytes"] / rows["dense fp32"]["size_bytes"])
    assert rows["pruned int8"]["size_bytes"] < 0.4 * rows["pruned fp32"]["size_bytes"]
    assert rows["dense fp32"]["metric"] == pytest.approx(tasks.accuracy(dense, dataset), abs=1e-9)
    assert rows["pruned fp32"]["metric"] == pytest.approx(tasks.accuracy(pruned, dataset), abs=1e-9)
    assert rows["pruned fp32"]["max_abs_diff"] <= 1e-4 < rows["pruned int8"]["max_abs_diff"]
    assert rows["dense fp32"]["latency_ms"] > 0 and rows["pruned int8"]["speedup_interval"] is not None


def test_int8_of_a_file_that_is_not_onnx_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExplorerError, match="int8 quantizer refused"):
        quantize.quantize_int8(bad, tmp_path / "out.onnx")


def _cancel_at(text_start: str):
    """A progress callback that records the steps and sets the cancel flag when a step starting so begins."""
    import threading

    cancel, seen = threading.Event(), []

    def progress(fraction: float, text: str) -> None:
        seen.append(text)
        if text.startswith(text_start):
            cancel.set()
    return progress, cancel, seen


def test_csr_timing_reports_each_layer_and_a_cancel_keeps_the_layers_timed():
    torch.manual_seed(0)
    model = build("mlp", (64,), 10).eval()
    progress, cancel, seen = _cancel_at("timing fc2")  # the user cancels while fc2 is timed
    result = sparse.end_to_end(model, torch.randn(2, 64), max_run_time=0.05, progress=progress, cancel=cancel)
    assert seen == ["timing fc1 dense vs CSR", "timing fc2 dense vs CSR"]
    assert [row["name"] for row in result["layers"]] == ["fc1", "fc2"] and result["cancelled"]
    assert result["speedup"] is None and result["max_abs_diff"] <= 1e-5  # the copy still computes the same


def test_int8_comparison_reports_its_steps_and_a_cancel_keeps_the_rows_done(tmp_path):
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    dense = build("mlp", dataset.input_shape, dataset.num_classes).eval()
    progress, cancel, seen = _cancel_at("timing and evaluating the pruned fp32")
    result = quantize.compare(dense, dense, dataset, batch=8, max_run_time=0.05, folder=tmp_path, progress=progress,
                              cancel=cancel)
    assert seen[:3] == ["exporting the dense fp32 model to ONNX", "exporting the pruned fp32 model to ONNX",
                        "quantizing the pruned model to int8"]
    assert [row["model"] for row in result["rows"]] == ["dense fp32", "pruned fp32"] and result["cancelled"]
    assert result["rows"][1]["metric"] == pytest.approx(tasks.accuracy(dense, dataset), abs=1e-9)
    early, stop, _ = _cancel_at("exporting the dense")  # before any file: no row, said as cancelled
    nothing = quantize.compare(dense, dense, dataset, folder=tmp_path / "early", progress=early, cancel=stop)
    assert nothing["rows"] == [] and nothing["cancelled"]
