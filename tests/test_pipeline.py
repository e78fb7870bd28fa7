import pytest
import torch
from torch import nn

from explorer import measure, pipeline, timing
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.models import build
from explorer.specs import MeasureSpec, PlanSpec, ScoringSpec


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_unstructured_estimate_is_exact_and_apply_leaves_the_base_untouched(digits):
    torch.manual_seed(0)
    model = build("lenet5", digits.input_shape, digits.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude"), dataset=digits)
    plan = pipeline.preview(prepared, PlanSpec(0.6, "local"))
    estimate = pipeline.estimate(prepared, plan)
    pruned = pipeline.apply(model, prepared, plan)
    counted = measure.count_params(pruned)
    assert estimate["params_after"] == counted["nonzero"]
    assert estimate["flops_after"] == measure.flops(pruned, digits.example_input(1))["effective"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the thresholds are the largest pruned |w| of each layer: every kept weight is at least that large
    cut = pipeline.thresholds(prepared, plan)
    for name, module in dict(pruned.named_modules()).items():
        if name in cut and cut[name] is not None:
            kept = module.weight[module.weight_mask.bool()].abs()
            assert float(kept.min()) >= cut[name]


def test_channel_estimate_close_to_the_real_pruned_model(digits):
    torch.manual_seed(0)
    model = build("resnet20", digits.input_shape, digits.num_classes)
    prepared = pipeline.prepare(model, ScoringSpec("channel", "magnitude"), dataset=digits)
    plan = pipeline.preview(prepared, PlanSpec(0.5, "local"))
    estimate = pipeline.estimate(prepared, plan)
    pruned = pipeline.apply(model, prepared, plan)
    real = measure.count_params(pruned)["total"]
    assert real < 0.5 * measure.count_params(model)["total"]
    assert abs(estimate["params_after"] - real) / real < 0.05
    real_flops = measure.flops(pruned, digits.example_input(1))["dense"]
    assert abs(estimate["flops_after"] - real_flops) / real_flops < 0.05
    out = pruned(digits.x_test[:4])
    assert out.shape == (4, 10)


def test_collapsed_plans_are_refused_with_advice(digits):
    model = build("mlp", digits.input_shape, digits.num_classes)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-4)
    prepared = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude"), dataset=digits)
    plan = pipeline.preview(prepared, PlanSpec(0.7, "global"))
    assert "fc2" in plan.collapsed
    with pytest.raises(ExplorerError, match="local scope"):
        pipeline.apply(model, prepared, plan)
    assert not pipeline.preview(prepared, PlanSpec(0.7, "local")).collapsed


def test_bad_choices(digits):
    model = build("mlp", digits.input_shape, digits.num_classes)
    with pytest.raises(ExplorerError, match="structure"):
        pipeline.prepare(model, ScoringSpec("blocks", "magnitude"), dataset=digits)
    with pytest.raises(ExplorerError, match="criterion"):
        pipeline.prepare(model, ScoringSpec("unstructured", "oracle"), dataset=digits)
    with pytest.raises(ExplorerError, match="needs data"):
        pipeline.prepare(model, ScoringSpec("unstructured", "taylor"), example_input=digits.example_input(1))
    linear_only = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ExplorerError, match="no channels"):
        pipeline.prepare(linear_only, ScoringSpec("channel", "magnitude"), dataset=digits)


def test_measure_run_reports_theory_and_measurement_side_by_side(digits):
    model = build("mlp", digits.input_shape, digits.num_classes)
    prepared = pipeline.prepare(model, ScoringSpec("channel", "magnitude"), dataset=digits)
    pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(0.5, "local")))
    metrics = pipeline.measure_run(model, pruned, digits, MeasureSpec(batch=8, min_run_time=0.05))
    for key in ("accuracy", "delta_accuracy", "speedup_flops", "speedup_measured", "latency_ms",
                "baseline_latency_ms", "size_compressed_bytes", "device", "batch", "threads"):
        assert metrics[key] is not None, key
    assert metrics["speedup_flops"] == pytest.approx(
        measure.flops(model, digits.example_input(8))["dense"] / measure.flops(pruned, digits.example_input(8))["dense"])


def test_masked_runs_are_timed_with_masks_folded(digits, monkeypatch):
    """Whoever calls, the timer only ever sees deployed models: no pruning hook, zeros kept."""
    model = build("mlp", digits.input_shape, digits.num_classes)
    prepared = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude"), dataset=digits)
    pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(0.5, "local")))
    timed = []
    real_timing = timing.time_alternating

    def spy(calls, **kwargs):
        timed.extend(call.__defaults__[0] for call in calls.values())  # each call is `lambda model=model: ...`
        return real_timing(calls, **kwargs)

    monkeypatch.setattr(timing, "time_alternating", spy)
    metrics = pipeline.measure_run(model, pruned, digits, MeasureSpec(batch=8, min_run_time=0.05))
    measure.compare_latency(model, pruned, digits.example_input(8), min_run_time=0.05)
    assert timed and not any(hasattr(m, "weight_mask") for t in timed for m in t.modules())
    folded_zeros = [float((m.fc1.weight == 0).float().mean()) for m in timed if m.fc1.weight.abs().sum() > 0]
    assert max(folded_zeros) == pytest.approx(0.5, abs=0.01)  # the pruned copy, zeros kept
    assert metrics["params_nonzero"] == measure.count_params(pruned)["nonzero"]


@pytest.mark.parametrize("criterion,scope", [("random", "local"), ("gradient", "global")])
def test_pruning_a_masked_model_again_keeps_what_is_pruned_and_reaches_the_exact_target(digits, criterion, scope):
    """Round 2 at 75 % on a 50 %-masked copy: exactly 75 % pruned, a superset of round 1, whatever the scores."""
    model = build("mlp", digits.input_shape, digits.num_classes)
    scoring = ScoringSpec("unstructured", criterion, calib_batches=1)
    prepared = pipeline.prepare(model, scoring, dataset=digits, seed=1)
    first = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(0.5, scope)))
    prepared = pipeline.prepare(first, scoring, dataset=digits, seed=2)
    plan = pipeline.preview(prepared, PlanSpec(0.75, scope))
    second = pipeline.apply(first, prepared, plan)
    total = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.classifier))
    dead_before = {n: getattr(first, n).weight_mask == 0 for n in ("fc1", "fc2", "classifier")}
    dead_after = {n: getattr(second, n).weight_mask == 0 for n in ("fc1", "fc2", "classifier")}
    assert sum(int(d.sum()) for d in dead_after.values()) == round(0.75 * total) == plan.pruned
    for name in dead_before:
        assert bool((dead_after[name] | ~dead_before[name]).all()), name  # nothing pruned before grows back
