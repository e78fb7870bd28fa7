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


def test_prune_measure_and_save_round_trip(capsys, tmp_path):
    path = tmp_path / "pruned.pt"
    code, out, _ = run_cli(capsys, "prune", "--model", "lenet5", "--structure", "channel", "--sparsity", "0.5",
                           "--measure", "--save", str(path), "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["latency_ms"]) == {"dense", "pruned", "device", "batch", "threads", "layout"}
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
