"""The Deploy page through AppTest: every control pressed, every number checked against a computation here.

Exported files are opened here (ONNX Runtime, os.path.getsize), FLOPs counted from the weights, the
CSR layers' sparsity counted from the pruned copy, the int8 file's accuracy computed through a session
opened here.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import onnxruntime as ort
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from explorer.layers import fold_masks
from tests.apptest import goto, set_sparsity, texts, wait_for_job


def _pruned_session(sparsity=0.9) -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=240).run()
    assert not at.exception, at.exception
    goto(at, "app_pages/prune.py")
    set_sparsity(at, sparsity)
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    return goto(at, "app_pages/deploy.py")


def _frame(at, column):
    """The table on the page that has ``column`` (AppTest keeps no key on a dataframe)."""
    return next(e.value for e in at.dataframe if column in e.value.columns)


def _linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_deploy_page_times_exports_sparsifies_and_quantizes_the_pruned_copy():
    at = _pruned_session()
    assert at.radio(key="deploy_what").value == "current pruned copy"
    pruned = fold_masks(at.session_state["pruned_result"]["module"])
    dense = at.session_state["current_model"]["module"]
    dataset = at.session_state["current_model"]["dataset"]

    at.multiselect(key="deploy_runtimes").set_value(["eager", "onnxruntime"])
    at.text_input(key="deploy_batches").set_value("1,4")
    at.number_input(key="deploy_max_s").set_value(0.2)
    at.button(key="deploy_time").click().run()
    wait_for_job(at, "deploy_job", what="deploy timing")
    assert not at.exception and not at.error, texts(at.error)
    table = _frame(at, "measured / FLOPs")
    assert list(zip(table["runtime"], table["batch"])) == [("eager", 1), ("eager", 4), ("onnxruntime", 1),
                                                           ("onnxruntime", 4)]
    dense_flops = 2 * sum(m.weight.numel() for _, m in _linears(dense))
    pruned_flops = 2 * sum(int(torch.count_nonzero(m.weight)) for _, m in _linears(pruned))
    assert f"{dense_flops:,} -> {pruned_flops:,} FLOPs per input" in texts(at.caption)
    result = at.session_state["deploy_result"]
    rows = next(iter(result.values()))["runtimes"]["rows"]
    for shown, row in zip(table["measured / FLOPs"], rows):
        assert shown == row["measured_over_flops"] == pytest.approx(row["speedup"] * pruned_flops / dense_flops)

    at.button(key="deploy_export").click().run()
    wait_for_job(at, "deploy_job", what="export")
    assert not at.exception and not at.error, texts(at.error)
    exported = next(iter(at.session_state["deploy_result"].values()))["exports"]
    assert [e["format"] for e in exported] == ["onnx", "torchscript", "pt2"]
    onnx_file = exported[0]["path"]
    assert exported[0]["size_bytes"] == os.path.getsize(onnx_file)
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x = dataset.example_input(7)
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - pruned(x).numpy()).max() <= 1e-5
    assert all(e["error"] is None and e["ok"] for e in exported)
    labels = [d.proto.label for d in at.get("download_button")]
    assert labels == [f"Download {Path(e['path']).name}" for e in exported]

    at.number_input(key="deploy_sparse_batch").set_value(2)
    at.button(key="deploy_sparse").click().run()
    wait_for_job(at, "deploy_job", what="CSR timing")
    assert not at.exception and not at.error, texts(at.error)
    layers = _frame(at, "CSR speed-up")
    assert layers["layer"].tolist() == [name for name, _ in _linears(pruned)]
    expected = [f"{100 * (1 - int(torch.count_nonzero(m.weight)) / m.weight.numel()):.1f} %" for _, m in _linears(pruned)]
    assert layers["sparsity"].tolist() == expected
    assert "outputs agree to" in texts(at.caption)

    at.button(key="deploy_int8").click().run()
    wait_for_job(at, "deploy_job", what="int8 comparison")
    assert not at.exception and not at.error, texts(at.error)
    int8 = next(iter(at.session_state["deploy_result"].values()))["int8"]
    shown = _frame(at, "x dense size")
    assert shown["model"].tolist() == ["dense fp32", "pruned fp32", "pruned int8"]
    for row in int8["rows"]:
        assert row["size_bytes"] == os.path.getsize(row["path"])
    assert int8["rows"][2]["size_bytes"] < 0.5 * int8["rows"][1]["size_bytes"]  # 8-bit weights, a quarter of fp32
    # The int8 file's accuracy from the file itself, evaluated here.
    x, y = dataset.split("test")
    quantized = int8["rows"][2]
    session = ort.InferenceSession(quantized["path"], providers=["CPUExecutionProvider"])
    # Dynamic int8 quantizes activations with each batch's own range, so batch as the app's evaluation does (256).
    predicted = np.concatenate([session.run(None, {"input": x[i:i + 256].numpy()})[0].argmax(1)
                                for i in range(0, len(x), 256)])
    assert shown["accuracy"].tolist()[2] == quantized["metric"] == pytest.approx(float((predicted == y.numpy()).mean()))

    # The same page on the stored run that Apply saved: its models come back from the store.
    at.radio(key="deploy_what").set_value("a stored run").run()
    assert not at.exception and not at.error, texts(at.error)
    run_id = at.selectbox(key="deploy_run").value
    assert run_id == at.session_state["pruned_result"]["run_id"]
    at.text_input(key="deploy_batches").set_value("1,zero")
    at.button(key="deploy_time").click().run()
    assert "Batch sizes must be whole numbers" in texts(at.error)
    at.text_input(key="deploy_batches").set_value("2")
    at.multiselect(key="deploy_runtimes").set_value(["eager"])
    at.button(key="deploy_time").click().run()
    wait_for_job(at, "deploy_job", what="deploy timing")
    assert not at.exception and not at.error, texts(at.error)
    stored = [value for key, value in at.session_state["deploy_result"].items() if key.startswith(f"run:{run_id}:")]
    assert [(r["runtime"], r["batch"]) for r in stored[0]["runtimes"]["rows"]] == [("eager", 2)]
    assert f"{dense_flops:,} -> {pruned_flops:,} FLOPs per input" in texts(at.caption)  # the same pruned weights


def test_deploy_page_without_a_pruned_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))  # an empty store: no run to offer either
    at = AppTest.from_file("../app.py", default_timeout=240).run()
    goto(at, "app_pages/deploy.py")
    assert "Nothing to deploy yet" in texts(at.info)


def test_deploy_timing_cancel_keeps_the_rows_done(monkeypatch):
    from explorer.deploy import runtimes

    started = __import__("threading").Event()

    def slow(dense, pruned, example, *, cancel=None, **_):  # one row done, then waits for Cancel
        started.set()
        cancel.wait(60)
        return {"rows": [{"runtime": "eager", "batch": 1, "error": "stand-in row"}], "cancelled": cancel.is_set(),
                "threads": 1, "threads_note": None, "load": {"load1": 0.0, "cores": 2}, "flops": {"dense": 2, "pruned": 1},
                "speedup_flops": 2.0}

    monkeypatch.setattr(runtimes, "compare_runtimes", slow)
    at = _pruned_session(0.5)
    at.button(key="deploy_time").click().run()
    assert started.wait(30)
    at.button(key="deploy_cancel").click().run()
    job = wait_for_job(at, "deploy_job", what="deploy timing")
    assert job.cancelled and "Timing cancelled: 1 row(s) done" in texts(at.warning)
    assert _frame(at, "measured / FLOPs")["speed-up (95 %)"].tolist() == ["stand-in row"]


def test_deploy_export_runs_in_the_background_and_cancel_keeps_the_files_written(monkeypatch):
    """Export, CSR and int8 ran in the foreground behind a spinner; now each is a job with a bar and Cancel."""
    import threading

    from explorer.deploy import export

    real, started, release = export.export, threading.Event(), threading.Event()

    def first_then_wait(model, example, fmt, path):  # the ONNX file is written, then the user presses Cancel
        result = real(model, example, fmt, path)
        started.set()
        release.wait(60)
        return result

    monkeypatch.setattr(export, "export", first_then_wait)
    at = _pruned_session(0.5)
    at.button(key="deploy_export").click().run()
    assert started.wait(60)
    at.run()
    assert any(bar.text.startswith("Exporting and checking: exporting and checking onnx") for bar in at.get("progress"))
    assert at.button(key="deploy_time").disabled and at.button(key="deploy_int8").disabled  # one step at a time
    at.button(key="deploy_cancel").click().run()
    release.set()
    job = wait_for_job(at, "deploy_job", what="export")
    assert job.cancelled and "Export cancelled: 1 of 3 formats done, kept below." in texts(at.warning)
    table = _frame(at, "max abs diff")
    assert table["format"].tolist() == ["onnx"] and Path(job.result[0]["path"]).stat().st_size > 0
    assert not at.button(key="deploy_export").disabled
