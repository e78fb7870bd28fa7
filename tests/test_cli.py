import json
import subprocess
import sys

import pytest
import torch

from explorer.cli import main
from explorer.models import load_model


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_json_contract_and_independent_counts(capsys):
    code, out, _ = run_cli(capsys, "prune", "--model", "mlp", "--sparsity", "0.5,0.9", "--scope", "global", "--json")
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["sparsity"] for r in results] == [0.5, 0.9]
    for result in results:
        assert set(result) >= {"layers", "collapsed", "collapse_point", "params", "flops"}
        total = sum(layer["total"] for layer in result["layers"])
        kept = sum(layer["kept"] for layer in result["layers"])
        assert total - kept == round(result["sparsity"] * total)
        assert result["params"]["total"] - result["params"]["nonzero"] == total - kept
        assert set(result["layers"][0]) == {"name", "kind", "total", "kept", "sparsity", "collapsed"}


def test_plan_only_gives_the_same_plan_without_applying_or_evaluating(capsys):
    argv = ["prune", "--model", "mlp", "--sparsity", "0.5,0.8", "--scope", "global", "--json"]
    _, full, _ = run_cli(capsys, *argv)
    code, planned, _ = run_cli(capsys, *argv, "--plan-only")
    assert code == 0
    for applied, plan in zip(map(json.loads, full.splitlines()), map(json.loads, planned.splitlines())):
        assert plan["layers"] == applied["layers"] and plan["collapse_point"] == applied["collapse_point"]
        assert plan["params"]["estimated"] and plan["params"]["nonzero"] == applied["params"]["nonzero"]
        assert "accuracy" not in plan and "task" not in plan and "size_bytes" not in plan and "error" not in plan
    code, _, err = run_cli(capsys, *argv, "--plan-only", "--save", "x.pt")
    assert code == 2 and "--plan-only" in err and err.count("\n") == 1


def test_prune_measure_and_save_round_trip(capsys, tmp_path):
    path = tmp_path / "pruned.pt"
    code, out, _ = run_cli(capsys, "prune", "--model", "lenet5", "--structure", "channel", "--sparsity", "0.5",
                           "--measure", "--save", str(path), "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["latency_ms"]) == {"dense", "pruned", "device", "batch", "threads", "layout", "dense_interval",
                                         "pruned_interval", "pairs", "seconds", "load", "threads_note"}
    low, high = result["speedup"]["measured_interval"]
    assert low <= result["speedup"]["measured"] <= high and isinstance(result["speedup"]["noisy"], bool)
    for model_name in ("dense", "pruned"):
        low, high = result["latency_ms"][f"{model_name}_interval"]
        assert low <= result["latency_ms"][model_name] <= high
    assert result["latency_ms"]["batch"] == 64 and result["latency_ms"]["layout"] == "channels_last"
    assert result["recipe"]["plan"]["sparsity"] == 0.5 and result["recipe"]["measure"]["batch"] == 64
    model = load_model(path)
    assert sum(p.numel() for p in model.parameters()) == result["params"]["total"]
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    from explorer.data import load_dataset
    data = load_dataset("digits")
    with torch.no_grad():
        manual = (model.eval()(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert result["accuracy"]["pruned"] == pytest.approx(manual)


def test_inspect_json_with_gradients(capsys):
    code, out, _ = run_cli(capsys, "inspect", "--model", "mlp", "--calib-batches", "1", "--json")
    assert code == 0
    layers = json.loads(out)["layers"]
    assert [layer["name"] for layer in layers] == ["fc1", "fc2", "classifier"]
    for key in ("kind", "shape", "count", "mean", "std", "min", "max", "mean_abs", "zeros_fraction", "hist", "gradient"):
        assert key in layers[0]


def test_collapsed_sparsity_reports_instead_of_crashing(capsys):
    code, out, _ = run_cli(capsys, "prune", "--model", "mlp", "--sparsity", "1.0", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["collapsed"]) == 3 and "error" in result


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--model", "mlp", "--sparsity", "1.5"], "outside"),
    (["prune", "--model", "mlp", "--sparsity", "0.5", "--criterion", "oracle"], "invalid choice"),
    (["prune", "--model", "missing.pt", "--sparsity", "0.5"], "does not exist"),
    (["prune", "--model", "mlp", "--sparsity", "0.5", "--protect", "nope"], "nope"),
])
def test_bad_arguments_exit_non_zero_with_one_line(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "explorer", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_model_that_wants_token_ids_fed_images_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    (tmp_path / "token_factory.py").write_text(
        "import torch\n"
        "class Encoder(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed = torch.nn.Embedding(100, 8)\n"
        "        self.head = torch.nn.Linear(8, 2)\n"
        "    def forward(self, ids):\n"
        "        batch, length = ids.shape  # wants (batch, length) token ids\n"
        "        return self.head(self.embed(ids).mean(1))\n"
        "def make(input_shape=None, num_classes=None):\n"
        "    return Encoder()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(capsys, "prune", "--model", "token_factory:make", "--structure", "unstructured",
                             "--criterion", "magnitude", "--scope", "global", "--sparsity", "0.5,0.9", "--json")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "token_factory:make" in lines[0] and "too many values to unpack" in lines[0] and "--data text" in lines[0]
