"""Deployment: exported files reloaded by hand and compared, runtimes timed side by side, the CLI's contract.

Every number is checked against something computed here, apart from the module under test: the ONNX
file's weights read with ``onnx.numpy_helper``, its outputs run through an ONNX Runtime session opened
here, sizes against ``os.path.getsize``, FLOPs against 2 x the non-zero weights of each Linear.
"""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.utils.prune as prune
from onnx import numpy_helper
from torch import nn

from explorer.cli import main
from explorer.deploy import export, runtimes, source
from explorer.errors import ExplorerError
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec
from explorer.zoo import build


def _mlp(seed=0):
    torch.manual_seed(seed)
    return build("mlp", (64,), 10).eval()


def _masked(model, amount=0.9):
    pruned = build("mlp", (64,), 10)
    pruned.load_state_dict(model.state_dict())
    for module in pruned.modules():
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, "weight", amount)
    return pruned.eval()


def _onnx_weights(path):
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def test_masked_model_exports_its_folded_weights_and_runs_back(tmp_path):
    dense = _mlp()
    masked = _masked(dense)
    x = torch.randn(3, 64)
    dense_file = export.export(dense, x, "onnx", tmp_path / "dense.onnx")
    result = export.export(masked, x, "onnx", tmp_path / "masked.onnx")
    assert result.ok and result.masked and result.dynamic_batch and result.exporter.startswith("torch.onnx")
    assert result.size_bytes == os.path.getsize(tmp_path / "masked.onnx")
    weights = _onnx_weights(tmp_path / "masked.onnx")
    assert not any(name.endswith(("_orig", "_mask")) for name in weights)  # masks baked in, no reparametrisation
    zeros = sum(int((w == 0).sum()) for w in weights.values() if w.ndim == 2)
    expected = sum(int((m.weight == 0).sum()) for m in masked.modules() if isinstance(m, nn.Linear))
    assert zeros == expected >= 0.89 * sum(m.weight.numel() for m in masked.modules() if isinstance(m, nn.Linear))
    # The file's own outputs, from a session opened here, on a batch size it was not traced with.
    session = ort.InferenceSession(str(tmp_path / "masked.onnx"), providers=["CPUExecutionProvider"])
    fresh = torch.randn(5, 64)
    got = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - masked(fresh).numpy()).max() <= 1e-5  # the masked model itself, hooks and all
    assert result.max_abs_diff <= 1e-5
    # Zeros do not shrink the raw file, they shrink the compressed one.
    assert abs(result.size_bytes - dense_file.size_bytes) < 0.02 * dense_file.size_bytes
    assert result.compressed_bytes < 0.4 * dense_file.compressed_bytes
    assert dense_file.compressed_bytes > 0.85 * dense_file.size_bytes  # random floats barely compress


def test_channel_pruned_model_exports_smaller_in_every_format(tmp_path):
    from explorer import pipeline
    from explorer.data import load_dataset

    dataset = load_dataset("digits")
    torch.manual_seed(0)
    dense = build("lenet5", dataset.input_shape, dataset.num_classes).eval()
    prepared = pipeline.prepare(dense, ScoringSpec(structure="channel"), dataset=dataset)
    pruned = pipeline.apply(dense, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5))).eval()
    x = dataset.example_input(2)
    results = export.export_all(pruned, x, tmp_path, stem="pruned")
    assert [r.format for r in results] == list(export.FORMATS)
    for result in results:
        assert result.ok and result.dynamic_batch, result
        assert result.size_bytes == os.path.getsize(result.path)
    dense_onnx = export.export(dense, x, "onnx", tmp_path / "dense.onnx")
    assert results[0].size_bytes < 0.75 * dense_onnx.size_bytes
    shapes = {tuple(w.shape) for w in _onnx_weights(results[0].path).values()}
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert tuple(module.weight.shape) in shapes  # the file holds the smaller layers themselves
    # The TorchScript and .pt2 files run back through the project's own loader too.
    from explorer.models import load_model

    for result in results[1:]:
        with torch.no_grad():
            assert torch.allclose(load_model(result.path)(x), pruned(x), atol=1e-5)


def test_transformer_exports_and_matches(tmp_path):
    from explorer import hf

    model = hf.builtin("tiny_bert").model.eval()
    ids = torch.randint(5, 500, (2, 16))
    ids[1, 9:] = model.pad_id
    result = export.export(model, ids, "onnx", tmp_path / "bert.onnx")
    assert result.ok and result.dynamic_batch, result
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": ids.numpy()})[0] - model(ids).numpy()).max() <= 1e-4


class _Zeta(nn.Module):  # an op ONNX has no translation for
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.special.zeta(self.fc(x), torch.tensor(2.0))


class _Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), _Zeta())

    def forward(self, x):
        return self.body(x)


def test_failed_export_names_the_op_and_the_layer_in_one_line(tmp_path):
    result = export.export(_Wrapped().eval(), torch.randn(2, 8), "onnx", tmp_path / "x.onnx")
    assert not result.ok and result.path is None
    assert "aten::special_zeta" in result.error and "layer 'body.1'" in result.error and "try" in result.error
    assert "\n" not in result.error
    own = export.export(_Zeta().eval(), torch.randn(2, 8), "onnx", tmp_path / "y.onnx")
    assert "the model's own forward" in own.error
    with pytest.raises(ExplorerError, match="Unknown export format"):
        export.export(_Zeta(), torch.randn(2, 8), "tflite", tmp_path / "z")


class _Spectrum(nn.Module):  # rfft: the TorchScript-based exporter refuses it, the torch.export-based one takes it
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).abs()


def test_onnx_falls_back_to_the_torch_export_based_exporter(tmp_path):
    model = _Spectrum().eval()
    result = export.export(model, torch.randn(2, 8), "onnx", tmp_path / "s.onnx")
    assert result.ok and result.exporter == "torch.onnx (torch.export-based)"
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - model(x).numpy()).max() <= 1e-5


def test_runtimes_side_by_side_against_hand_flops(monkeypatch):
    monkeypatch.setattr(runtimes, "COMPILE_BACKEND", "aot_eager")  # the compile path without a C++ build
    dense = _mlp()
    masked = _masked(dense, 0.75)
    result = runtimes.compare_runtimes(dense, masked, torch.randn(4, 64), runtimes=("eager", "compile", "onnxruntime"),
                                       batches=(1, 3), min_run_time=0.05, max_run_time=0.2)
    linears = [m for m in masked.modules() if isinstance(m, nn.Linear)]
    assert result["flops"]["dense"] == 2 * sum(m.weight.numel() for m in linears)
    assert result["flops"]["pruned"] == 2 * sum(int(torch.count_nonzero(m.weight)) for m in linears)
    assert [(r["runtime"], r["batch"]) for r in result["rows"]] == [
        ("eager", 1), ("eager", 3), ("compile", 1), ("compile", 3), ("onnxruntime", 1), ("onnxruntime", 3)]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["threads"] == result["threads"] >= 1 and row["device"] == "cpu"
        assert row["speedup_interval"][0] <= row["speedup"] <= row["speedup_interval"][1]
        assert row["measured_over_flops"] == pytest.approx(row["speedup"] * result["flops"]["pruned"]
                                                           / result["flops"]["dense"])
        assert row["dense_interval_ms"][0] <= row["dense_ms"] <= row["dense_interval_ms"][1]
    assert set(result["rows"][2]["setup_s"]) == {"dense", "pruned"}  # compile time, apart from the timing
    assert result["rows"][0]["setup_s"] is None


def test_runtime_names_are_checked_and_a_missing_provider_is_a_row_not_a_crash():
    with pytest.raises(ExplorerError, match="Unknown runtime 'tvm'"):
        runtimes.parse_runtimes("eager,tvm")
    with pytest.raises(ExplorerError, match="at least one runtime"):
        runtimes.parse_runtimes(" , ")
    assert runtimes.parse_runtimes(["eager", "eager", "onnxruntime"]) == ("eager", "onnxruntime")
    if "onnxruntime-cuda" in runtimes.available_runtimes():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    dense = _mlp()
    result = runtimes.compare_runtimes(dense, _masked(dense), torch.randn(2, 64), runtimes=("onnxruntime-cuda",),
                                       batches=(1,), min_run_time=0.05, max_run_time=0.1)
    assert "not available here" in result["rows"][0]["error"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_deploy_a_saved_model_with_exports(capsys, tmp_path):
    saved = tmp_path / "pruned.pt"
    assert run_cli(capsys, "prune", "--model", "mlp", "--sparsity", "0.8", "--save", str(saved))[0] == 0
    code, out, err = run_cli(capsys, "deploy", "--model", str(saved), "--runtimes", "eager,onnxruntime",
                             "--batch", "1,4", "--max-run-time", "0.2", "--export", str(tmp_path / "out"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["data"] == "digits" and result["note"] is None
    assert [(r["runtime"], r["batch"]) for r in result["runtimes"]["rows"]] == [
        ("eager", 1), ("eager", 4), ("onnxruntime", 1), ("onnxruntime", 4)]
    from explorer.models import load_model

    pruned = load_model(saved)
    nonzero = sum(int(torch.count_nonzero(m.weight)) for m in pruned.modules() if isinstance(m, nn.Linear))
    assert result["runtimes"]["flops"]["pruned"] == 2 * nonzero
    for label in ("dense", "pruned"):
        for item in result["exports"][label]:
            assert item["ok"] and item["size_bytes"] == os.path.getsize(item["path"])
    assert result["exports"]["pruned"][0]["compressed_bytes"] < 0.5 * result["exports"]["dense"][0]["compressed_bytes"]
    code, out, _ = run_cli(capsys, "deploy", "--model", str(saved), "--runtimes", "eager", "--batch", "2",
                           "--max-run-time", "0.1", "--quantize", "int8")
    assert code == 0 and "eager             batch 2" in out and "measured / FLOPs" in out
    assert "pruned int8" in out and "on ONNX Runtime, accuracy" in out


@pytest.mark.parametrize("argv, says", [
    (["--model", "missing.pt"], "no such file"),
    (["--model", "run:abc"], "give a run number"),
    (["--model", "run:999"], "There is no run 999"),
    (["--model", "x.pt", "--runtimes", "tvm"], "Unknown runtime 'tvm'"),
    (["--model", "x.pt", "--max-run-time", "0"], "--max-run-time"),
])
def test_cli_deploy_refuses_bad_input_in_one_line(capsys, argv, says):
    code, out, err = run_cli(capsys, "deploy", *argv)
    assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_cli_deploy_refuses_a_file_that_is_not_a_saved_model(capsys, tmp_path):
    other = tmp_path / "weights.pt"
    torch.save(_mlp().state_dict(), other)
    code, _, err = run_cli(capsys, "deploy", "--model", str(other))
    assert code == 2 and "not saved by Pruning Explorer" in err
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal, one line
        main(["deploy", "--model", "x", "--batch", "1,0"])
    assert stop.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_a_stored_run_gives_its_pruned_weights_and_its_recipe_dense_model(tmp_path):
    from explorer import pipeline
    from explorer.recipe import Recipe
    from explorer.store import Run, RunStore

    recipe = Recipe(model=ModelSpec(source="mlp", baseline=False), plan=PlanSpec(sparsity=0.7)).validate()
    dense, dataset, _ = pipeline.resolve_model(recipe.model, seed=recipe.seed)
    prepared = pipeline.prepare(dense, recipe.scoring, dataset=dataset)
    pruned = pipeline.apply(dense, prepared, pipeline.preview(prepared, recipe.plan))
    store = RunStore(tmp_path / "store")
    run = store.save(Run.from_recipe(recipe, model_name="mlp", dataset=dataset.name), pruned,
                     input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    pair = source.load_pair(f"run:{run.id}", store=store)
    assert pair.dense_trained and pair.dataset.name == dataset.name
    x = dataset.example_input(8)
    with torch.no_grad():
        assert torch.equal(pair.dense(x), dense(x))
        assert torch.allclose(pair.pruned(x), pruned(x), atol=1e-6)
    store.weights_path(run.id).unlink()
    with pytest.raises(ExplorerError, match="no stored weights"):
        source.load_pair(f"run:{run.id}", store=store)


def test_a_saved_file_without_recipe_gets_a_fresh_full_width_dense_model(tmp_path):
    from explorer.models import save_model

    model = _masked(_mlp())
    path = save_model(model, tmp_path / "m.pt", arch="mlp", input_shape=(64,), num_classes=10)
    with pytest.raises(ExplorerError, match="No built-in dataset"):
        source.load_pair(str(path))
    path = save_model(build("mlp", (1, 8, 8), 10), tmp_path / "d.pt", arch="mlp", input_shape=(1, 8, 8), num_classes=10)
    pair = source.load_pair(str(path))
    assert not pair.dense_trained and "fresh weights" in pair.note and pair.dataset.name == "digits"


def test_a_recipe_naming_runtimes_reports_them_from_run(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {source: mlp, baseline: false}\nplan: {sparsity: 0.8}\n"
                      "measure: {batch: 4, max_run_time: 0.5, runtimes: [eager, onnxruntime]}\n")
    code, out, err = run_cli(capsys, "run", "--recipe", str(recipe), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["recipe"]["measure"]["runtimes"] == ["eager", "onnxruntime"]
    timed = result["metrics"]["runtimes"]
    assert [(r["runtime"], r["batch"]) for r in timed["rows"]] == [("eager", 4), ("onnxruntime", 4)]
    assert timed["flops"]["pruned"] == result["metrics"]["flops_effective"]  # the run's own FLOPs count
    code, out, _ = run_cli(capsys, "run", "--recipe", str(recipe))
    assert code == 0 and "onnxruntime       batch 4" in out
    recipe.write_text("model: {source: mlp}\nmeasure: {runtimes: [eager, tvm]}\n")
    code, _, err = run_cli(capsys, "run", "--recipe", str(recipe))
    assert code == 2 and "runtimes: Unknown runtime 'tvm'" in err and err.count("\n") == 1
