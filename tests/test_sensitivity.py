"""Sensitivity scans: every sampled cell equals a direct prune-and-evaluate; order, contract, CLI, cancel, bad input."""
import argparse
import contextlib
import dataclasses
import io
import json
import threading

import numpy as np
import pytest
import torch
from torch import nn

from explorer import cli, pipeline, planner, sensitivity
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model
from explorer.models import build
from explorer.specs import PlanSpec, ScoringSpec
from explorer.train import TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes")


@pytest.fixture(scope="module")
def lenet(digits):
    torch.manual_seed(0)
    model = build("lenet5", digits.input_shape, digits.num_classes)
    return train(model, digits, TrainConfig(epochs=2, lr=3e-3, seed=0)).model.cpu().eval()


def _random_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm with non-trivial statistics and a bias, so a removed channel's BN would still emit something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.5 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def resnet(shapes):
    torch.manual_seed(0)
    return _random_batchnorm(build("resnet20", shapes.input_shape, shapes.num_classes), 1)


def _subset(dataset, split, n):
    x, y = dataset.split(split)
    return dataclasses.replace(dataset, **{f"x_{split}": x[:n], f"y_{split}": y[:n]})


def _direct(model, prepared, unit, sparsity, dataset, split, n):
    """Prune-and-evaluate the independent way: a plan with every other unit protected, pipeline.apply, evaluate."""
    others = tuple(name for name in prepared.names if name != unit)
    plan = pipeline.preview(prepared, PlanSpec(sparsity=sparsity, scope="local", protect=others))
    pruned = pipeline.apply(model, prepared, plan)
    return evaluate(pruned, _subset(dataset, split, n), split)["accuracy"], plan


def test_unstructured_cells_equal_masking_and_evaluating(lenet, digits):
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    prepared = pipeline.prepare(lenet, ScoringSpec("unstructured", "magnitude"), dataset=digits)
    result = sensitivity.scan(lenet, digits, ScoringSpec("unstructured", "magnitude"), samples=200,
                              prepared=prepared)
    assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
    assert result.units == list(prepared.names) and result.samples == 200 and result.split == "val"
    assert len(result.cells) == len(result.units) * len(sensitivity.DEFAULT_SPARSITIES)
    assert result.base == evaluate(lenet, _subset(digits, "val", 200), "val")["accuracy"]
    for unit, sparsity in (("features.conv2", 0.8), ("classifier.fc1", 0.95), ("classifier.fc3", 0.5)):
        cell = next(c for c in result.row(unit) if c.sparsity == sparsity)
        value, plan = _direct(lenet, prepared, unit, sparsity, digits, "val", 200)
        assert cell.value == value
        assert cell.drop == pytest.approx(result.base - value)
        weights = dict(lenet.named_modules())[unit].weight
        assert cell.pruned == round(sparsity * weights.numel()) == plan.layer(unit).pruned
        assert cell.params_saved == cell.pruned  # unstructured: one parameter per pruned weight
    assert any(c.drop > 0.05 for c in result.cells)  # the trained model does feel it


def test_order_is_robust_to_fragile_by_the_area_under_the_drop_curve(lenet, digits):
    result = sensitivity.scan(lenet, digits, ScoringSpec("unstructured", "magnitude"), samples=200)
    areas = {}
    for unit in result.units:
        row = sorted(result.row(unit), key=lambda cell: cell.sparsity)
        xs = np.array([0.0] + [cell.sparsity for cell in row])
        ys = np.array([0.0] + [result.base - cell.value for cell in row])
        areas[unit] = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    assert result.order == sorted(result.units, key=lambda unit: (areas[unit], result.units.index(unit)))
    assert areas[result.order[0]] < areas[result.order[-1]]
    assert result.areas() == pytest.approx(areas)


def test_channel_cells_equal_physical_removal_on_residual_groups(resnet, shapes):
    prepared = pipeline.prepare(resnet, ScoringSpec("channel", "magnitude"), dataset=shapes)
    result = sensitivity.scan(resnet, shapes, ScoringSpec("channel", "magnitude"), sparsities=[0.3, 0.9],
                              samples=128, prepared=prepared)
    assert result.physical == [] and len(result.cells) == 2 * len(prepared.groups)
    kinds = {group.name: group.kind for group in prepared.groups}
    sampled = (("conv1", 0.9), ("layer2.0.conv1", 0.3), ("layer3.0.conv2", 0.9))
    assert {kinds[unit] for unit, _ in sampled} == {"residual-coupled", "conv"}
    for unit, sparsity in sampled:
        cell = next(c for c in result.row(unit) if c.sparsity == sparsity)
        value, plan = _direct(resnet, prepared, unit, sparsity, shapes, "val", 128)
        assert cell.value == value
        estimate = pipeline.estimate(prepared, plan)
        assert cell.flops_saved == estimate["flops_dense"] - estimate["flops_after"] > 0
    assert len({cell.value for cell in result.cells}) > 3  # the cells differ: the check has power


def test_rerunning_only_what_a_unit_changes_equals_the_whole_forward(resnet, shapes, monkeypatch):
    prepared = pipeline.prepare(resnet, ScoringSpec("channel", "magnitude"), dataset=shapes)
    scoring = ScoringSpec("channel", "magnitude")
    partial = sensitivity.scan(resnet, shapes, scoring, sparsities=[0.5, 0.95], samples=128, prepared=prepared)
    monkeypatch.setattr(sensitivity._Replay, "focus", lambda self, layers: None)  # every cell: the whole forward
    whole = sensitivity.scan(resnet, shapes, scoring, sparsities=[0.5, 0.95], samples=128, prepared=prepared)
    assert [cell.value for cell in partial.cells] == [cell.value for cell in whole.cells]
    assert len({cell.value for cell in whole.cells}) > 2


@pytest.mark.parametrize("name, units", [("resnet20", ("conv1", "layer3.0.conv2")),
                                         ("mobilenetv2_small", ("stem.conv", "blocks.1.expand.conv"))])
def test_zeroed_consumer_columns_compute_what_removed_channels_compute(shapes, name, units):
    torch.manual_seed(0)
    model = _random_batchnorm(build(name, shapes.input_shape, shapes.num_classes), 2)
    prepared = pipeline.prepare(model, ScoringSpec("channel", "magnitude"), dataset=shapes)
    x = shapes.x_val[:32]
    for unit in units:
        others = tuple(n for n in prepared.names if n != unit)
        plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local", protect=others))
        with torch.no_grad():
            dense = model(x)
            physical = pipeline.apply(model, prepared, plan)(x)
            emulated = sensitivity.emulate(model, prepared, plan)(x)
            # the tempting shortcut, zeroing the producers' filters, is not the same: BatchNorm still emits its bias
            producers = clone_model(model)
            group = next(g for g in prepared.groups if g.name == unit)
            gone = set(planner.pruned_indices(prepared.ranking, plan, unit).tolist())
            modules = dict(producers.named_modules())
            for member in group.members:
                if member.cut == "out" and not isinstance(modules[member.layer], nn.BatchNorm2d):
                    rows = [i for i, u in zip(member.idxs, member.units) if u in gone]
                    modules[member.layer].weight[rows] = 0
            shortcut = producers(x)
        change = float((physical - dense).abs().max())  # fresh mobilenet outputs move little: compare relatively
        assert change > 0
        assert float((emulated - physical).abs().max()) <= 1e-3 * change, f"{name} {unit}"
        assert float((shortcut - physical).abs().max()) >= 0.1 * change


def test_a_collapsed_cell_is_the_unit_switched_off_and_flagged(digits, lenet):
    result = sensitivity.scan(lenet, digits, ScoringSpec("channel", "magnitude"), sparsities=[0.95], samples=100)
    conv1 = result.row("features.conv1")[0]  # 6 filters: round(0.95 * 6) = 6
    assert conv1.collapsed and conv1.pruned == conv1.total == 6 and conv1.value is not None
    assert not result.row("classifier.fc1")[0].collapsed
    json.dumps(result.to_dict())


def _model_args(p):  # the CLI's model flags (explorer.cli.build_parser's model_args)
    p.add_argument("--model", required=True)
    p.add_argument("--data")
    p.add_argument("--data-file")
    p.add_argument("--arch")
    p.add_argument("--weights")
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _sensitivity(argv):
    parser = argparse.ArgumentParser()
    sensitivity.add_command(parser.add_subparsers(dest="command"), _model_args)
    return sensitivity.command(parser.parse_args(["sensitivity", *argv]))[0]


def _prune(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["prune", *argv, "--scope", "local", "--json"]) == 0
    return json.loads(out.getvalue().splitlines()[0])


@pytest.mark.parametrize("model, structure, sparsity, units", [
    ("lenet5", "unstructured", 0.9, ("features.conv2", "classifier.fc2")),
    ("resnet20", "channel", 0.5, ("layer2.0.conv2",)),
])
def test_headless_contract_and_a_cell_equals_the_prune_command(model, structure, sparsity, units):
    result = _sensitivity(["--model", model, "--structure", structure, "--sparsities", str(sparsity),
                           "--split", "test", "--samples", "all"])
    assert {"metric", "split", "samples", "base", "cells", "order"} <= set(result)
    assert result["metric"] == "accuracy" and result["split"] == "test"
    assert all({"unit", "sparsity", "value", "drop"} <= set(cell) for cell in result["cells"])
    assert sorted(result["order"]) == sorted(result["units"])
    json.dumps(result)
    for unit in units:
        cell = next(c for c in result["cells"] if c["unit"] == unit)
        others = [name for name in result["units"] if name != unit]
        pruned = _prune(["--model", model, "--structure", structure, "--sparsity", str(sparsity), "--protect", *others])
        assert cell["value"] == pruned["accuracy"]["pruned"]
        assert result["base"] == pruned["accuracy"]["base"]
        assert result["samples"] == len(load_dataset(pruned["data"]).y_test)


def test_cancel_returns_the_cells_done(lenet, digits):
    prepared = pipeline.prepare(lenet, ScoringSpec("unstructured", "magnitude"), dataset=digits)
    stop, seen = threading.Event(), []

    def progress(fraction, text):
        seen.append(fraction)
        if len(seen) == 3:
            stop.set()

    result = sensitivity.scan(lenet, digits, ScoringSpec("unstructured", "magnitude"), sparsities=[0.5, 0.9],
                              samples=64, prepared=prepared, progress=progress, cancel=stop)
    assert result.cancelled and len(result.cells) == 3
    assert result.order == [prepared.names[0]]  # only the complete row is ranked
    fractions = []
    full = sensitivity.scan(lenet, digits, ScoringSpec("unstructured", "magnitude"), sparsities=[0.5, 0.9],
                            samples=64, prepared=prepared, progress=lambda fraction, text: fractions.append(fraction))
    assert not full.cancelled and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [dataclasses.asdict(c) for c in full.cells[:3]] == [dataclasses.asdict(c) for c in result.cells]


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "A validation subset of 0 samples is empty"),
    ({"samples": -3}, "A validation subset of -3 samples is empty"),
    ({"sparsities": []}, "at least one sparsity"),
    ({"sparsities": [0.0, 0.5]}, "outside (0, 1]"),
    ({"sparsities": [1.5]}, "outside (0, 1]"),
    ({"split": "holdout"}, "Unknown split 'holdout'"),
])
def test_bad_input_is_one_line(digits, lenet, kwargs, message):
    with pytest.raises(ExplorerError) as error:
        sensitivity.scan(lenet, digits, ScoringSpec("unstructured", "magnitude"), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_structure_that_fixes_the_sparsity_is_one_line(digits, lenet):
    from explorer.specs import STRUCTURES

    if "nm" not in STRUCTURES:
        pytest.skip("no N:M structure in this tree")
    with pytest.raises(ExplorerError, match="fixes the sparsity") as error:
        sensitivity.scan(lenet, digits, ScoringSpec("nm", "magnitude"))
    assert "\n" not in str(error.value)


def test_a_model_without_prunable_units_is_one_line(digits):
    model = nn.Sequential(nn.Flatten())
    with pytest.raises(ExplorerError, match="no prunable layer") as error:
        sensitivity.scan(model, digits, ScoringSpec("unstructured", "magnitude"))
    assert "\n" not in str(error.value)


def test_head_units_are_pruned_physically_and_judged_by_fidelity():
    transformers = pytest.importorskip("transformers")
    from explorer import tasks
    from explorer.data import Dataset

    class Encoder(nn.Module):
        task = "embedding"

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=48, max_position_embeddings=32)
            self.hf = transformers.BertModel(config).eval()

        def forward(self, ids):
            return self.hf(input_ids=ids).last_hidden_state.mean(1)

    ids = torch.randint(1, 300, (60, 12), generator=torch.Generator().manual_seed(1))
    text = Dataset(name="ids", input_shape=(12,), num_classes=0, class_names=(), x_train=ids[:20],
                   y_train=torch.zeros(20), x_val=ids[20:40], y_val=torch.zeros(20), x_test=ids[40:],
                   y_test=torch.zeros(20), info={"labelled": False})
    model = Encoder()
    prepared = pipeline.prepare(model, ScoringSpec("head", "magnitude"), dataset=text)
    result = sensitivity.scan(model, text, ScoringSpec("head", "magnitude"), sparsities=[0.5], samples=16,
                              prepared=prepared)
    assert (result.metric, result.measure, result.base) == ("fidelity", "cosine", 1.0)
    assert result.physical == result.units and len(result.cells) == len(result.units)
    unit = result.units[0]
    others = tuple(name for name in result.units if name != unit)
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local", protect=others))
    direct = tasks.evaluate_task(pipeline.apply(model, prepared, plan), _subset(text, "val", 16), reference=model,
                                 task="fidelity", split="val")["value"]
    assert result.row(unit)[0].value == pytest.approx(direct, abs=1e-6) and direct < 1.0
    assert result.row(unit)[0].drop == pytest.approx(1.0 - direct)


def test_latency_is_measured_per_cell_on_request(digits):
    torch.manual_seed(0)
    model = build("mlp", digits.input_shape, digits.num_classes).eval()
    result = sensitivity.scan(model, digits, ScoringSpec("channel", "magnitude"), sparsities=[0.5], samples=32,
                              latency=True)
    assert result.base_latency_ms > 0 and all(cell.latency_ms > 0 for cell in result.cells)
    assert all(isinstance(cell.latency_noisy, bool) for cell in result.cells)
    assert all(cell.params_saved > 0 and cell.flops_saved > 0 for cell in result.cells)
    plain = sensitivity.scan(model, digits, ScoringSpec("channel", "magnitude"), sparsities=[0.5], samples=32)
    assert plain.base_latency_ms is None and all(cell.latency_ms is None for cell in plain.cells)
