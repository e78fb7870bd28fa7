"""The shared figures: each built from plain data, checked on that data (not on pixels)."""
import random

import pandas as pd
import pytest
import torch

from explorer import figures, planner, stats
from explorer.models import build
from explorer.store import Run


def test_plan_sparsity_draws_each_layer_and_marks_collapse_and_protection():
    ranking = planner.prepare({"a": torch.arange(10.0), "b": torch.arange(10.0) + 100, "c": torch.rand(4)})
    plan = planner.plan(ranking, 0.5, "global", protect=["c"])
    figure = figures.plan_sparsity(plan)
    bar = figure.data[0]
    assert list(bar.x) == ["a", "b", "c"]
    assert list(bar.y) == [1.0, 0.0, 0.0]  # the 10 lowest of a and b are all of a: a collapses
    assert list(bar.marker.color) == [figures.COLLAPSED, figures.PRUNED, figures.PROTECTED]
    assert figure.layout.shapes[0].y0 == 0.5  # the requested sparsity line


def test_histograms_keep_every_count_and_draw_the_cut_on_both_sides():
    model = build("mlp", (1, 8, 8), 10)
    summaries = stats.weight_stats(model, bins=20)
    figure = figures.histograms(summaries, ["fc1", "classifier"], "weights", thresholds={"fc1": 0.05, "classifier": None})
    assert [sum(trace.y) for trace in figure.data] == [64 * 256, 128 * 10]
    assert sorted(shape.x0 for shape in figure.layout.shapes) == [-0.05, 0.05]


def test_pareto_front_equals_brute_force():
    rng = random.Random(3)
    table = pd.DataFrame([{"latency (ms)": rng.random(), "accuracy": rng.random(), "name": f"r{i}"} for i in range(40)])
    front = set(figures.pareto_front(table)["name"])
    brute = {r["name"] for _, r in table.iterrows()
             if not any(q["latency (ms)"] < r["latency (ms)"] and q["accuracy"] >= r["accuracy"]
                        for _, q in table.iterrows())}
    assert front == brute and front


def runs():
    common = dict(model_name="mlp", dataset="digits", structure="unstructured", criterion="magnitude", scope="global")
    return [Run(**common, sparsity=0.5, id=1, name="a", metrics={"accuracy": 0.9, "delta_accuracy": -0.05,
                                                                  "latency_ms": 1.0, "speedup_measured": 1.0,
                                                                  "speedup_flops": 2.0}),
            Run(**common, sparsity=0.9, id=2, name="b", settings={"finetune": {"epochs_done": 2}},
                recipe={"method": {"name": "gradual"}},
                metrics={"accuracy": 0.8, "delta_accuracy": -0.15, "latency_ms": 0.9, "speedup_measured": 1.1,
                         "speedup_flops": 10.0}, trajectory=[{"epoch": 0, "sparsity": 0.2, "val_accuracy": 0.5}])]


def test_runs_frame_and_compare_charts_stay_within_their_ranges():
    table = figures.runs_frame(runs())
    assert table["method"].tolist() == ["unstructured / magnitude / global",
                                        "unstructured / magnitude / global / gradual"]
    assert table["tuned"].tolist() == ["pruned only", "fine-tuned"]
    assert table["trained epochs"].tolist() == [0, 2]
    assert table["Δ accuracy (pts)"].tolist() == pytest.approx([-5.0, -15.0])
    assert tuple(figures.accuracy_vs_sparsity(table).layout.xaxis.range) == (-0.02, 1.02)
    speed = figures.speedup_promise(table)
    assert speed.data[-1].name == "y = x (promise kept)" and speed.layout.xaxis.range[1] == pytest.approx(10.5)
    assert figures.accuracy_vs_latency(table).data[-1].name == "Pareto front"


def test_a_methods_run_is_labelled_by_the_training_its_method_did():
    """A Methods lab run trained 3 epochs inside its budget is not 'fine-tune epochs 0, pruned only'."""
    common = dict(model_name="lenet5", dataset="digits", structure="unstructured", criterion="magnitude",
                  scope="global", sparsity=0.9, metrics={"accuracy": 0.5})
    trajectory = [{"epoch": epoch, "sparsity": 0.9, "val_accuracy": 0.5} for epoch in (0, 1, 2, 3)]
    lab = [Run(**common, id=1, name="iterative", recipe={"method": {"name": "iterative"}, "budget": {"epochs": 3}},
               trajectory=trajectory),
           Run(**common, id=2, name="one-shot in the lab", recipe={"method": {"name": "one_shot"}}, trajectory=trajectory),
           Run(**common, id=3, name="Prune page", recipe={"method": {"name": "one_shot"}})]
    table = figures.runs_frame(lab)
    assert table["trained epochs"].tolist() == [3, 3, 0] and table["fine-tune epochs"].tolist() == [0, 0, 0]
    assert table["tuned"].tolist() == ["trained by its method", "trained by its method", "pruned only"]
    symbols = {trace.name.split(", ")[-1]: trace.marker.symbol for trace in figures.accuracy_vs_sparsity(table).data}
    assert symbols == {"trained by its method": "square", "pruned only": "circle"}


def test_runs_frame_shows_the_2_4_kernel_speed_up_only_where_it_was_timed():
    timed, untimed = runs()
    timed.metrics["semi_structured"] = {"available": True, "speedup": 1.37}
    untimed.metrics["semi_structured"] = {"available": False, "reason": "No CUDA GPU here."}
    assert figures.runs_frame([timed, untimed])["speed-up 2:4 kernels"].tolist()[0] == 1.37
    assert pd.isna(figures.runs_frame([untimed])["speed-up 2:4 kernels"].tolist()[0])


def test_trajectories_and_cost_bars_carry_their_numbers():
    traj = {"one_shot": [{"epoch": 0, "sparsity": 0.9, "val_accuracy": None}, {"epoch": 1, "sparsity": 0.9,
                                                                               "val_accuracy": 0.7}]}
    figure = figures.trajectories(traj)
    assert list(figure.data[0].x) == [1] and list(figure.data[0].y) == [0.7]
    assert list(figure.data[1].y) == [0.9, 0.9]
    bars = figures.cost_side_by_side([{"label": "unstructured 90 %", "speedup_flops": 8.0, "speedup_measured": 1.0,
                                       "compression_ratio": 5.0}])
    assert [trace.y[0] for trace in bars.data] == [8.0, 1.0, 5.0]


def test_training_curve_and_summary():
    curve = figures.training_curve([(1, 2.0), (2, 1.5)], [(2, 0.6)])
    assert list(curve.data[0].y) == [2.0, 1.5] and list(curve.data[1].x) == [2]
    assert curve.data[1].name == "validation accuracy (epoch)" and curve.layout.yaxis2.tickformat == ".0%"
    assert list(curve.layout.yaxis2.range) == [0, 1.02] and curve.layout.yaxis2.title.text == "accuracy"
    perplexity = figures.training_curve([(1, 9.0)], [(1, 1233.0)], metric="perplexity", percent=False)
    assert perplexity.data[1].name == "validation perplexity (epoch)" and perplexity.layout.yaxis2.range is None
    assert perplexity.layout.yaxis2.title.text == "perplexity" and not perplexity.layout.yaxis2.tickformat
    weights = stats.weight_stats(build("mlp", (1, 8, 8), 10))
    summary = figures.layer_summary(weights)
    assert list(summary.data[0].x) == ["fc1", "fc2", "classifier"] and len(summary.data) == 2


def test_norm_distributions_overlay_every_value_before_and_after():
    before = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    after = {"a": torch.tensor([0.0, 0.5]), "b": torch.tensor([0.0])}
    figure = figures.norm_distributions(before, after, "|w|")
    assert [list(trace.x) for trace in figure.data] == [[1.0, 2.0, 3.0], [0.0, 0.5, 0.0]]
    assert [trace.name for trace in figure.data] == ["before", "after"]


def _scan_dict(drops: dict, order: list, sparsities=(0.25, 0.5, 0.75), measure="accuracy") -> dict:
    """A `Scan.to_dict()` by hand: ``drops[unit]`` lists the unit's drops over the grid (shorter: cancelled)."""
    cells = [{"unit": unit, "sparsity": s, "value": None if d is None else 0.9 - d, "drop": d, "pruned": 1, "total": 4,
              "params_saved": 10 * i, "flops_saved": 20 * i, "collapsed": d is None, "latency_ms": None}
             for unit, row in drops.items() for i, (s, d) in enumerate(zip(sparsities, row))]
    return {"metric": measure, "measure": measure, "split": "val", "samples": 8, "base": 0.9, "cells": cells,
            "order": order, "higher_is_better": True, "structure": "channel", "criterion": "magnitude",
            "sparsities": list(sparsities), "units": list(drops), "physical": [], "base_latency_ms": None,
            "seconds": 0.1, "cancelled": False}


def test_sensitivity_heatmap_rows_follow_the_order_and_cells_hold_the_drops():
    drops = {"a": [0.1, 0.3, 0.6], "b": [0.0, 0.01, None], "c": [0.2]}  # b's last cell has no value; c was cancelled
    scan = _scan_dict(drops, order=["b", "a"])
    heat = figures.sensitivity_heatmap(scan).data[0]
    assert list(heat.y) == ["b", "a", "c"]  # robust -> fragile, then the unfinished row
    assert list(heat.x) == ["25%", "50%", "75%"]
    assert [list(row) for row in heat.z] == [[0.0, 1.0, None], [10.0, 30.0, 60.0], [20.0, None, None]]  # in points
    assert heat.colorbar.ticksuffix == " pts" and "drop %{z:.1f} pts" in heat.hovertemplate
    assert "saves 20 params, 40 FLOPs" in heat.customdata[1][2] and heat.customdata[2][1] == "not scanned"


def test_sensitivity_curves_start_dense_skip_missing_values_and_draw_the_goal():
    scan = _scan_dict({"a": [0.1, 0.3, 0.6], "b": [0.0, 0.01, None]}, order=["b", "a"])
    figure = figures.sensitivity_curves(scan, units=["a", "b"], max_drop=0.05)
    assert [trace.name for trace in figure.data] == ["b", "a"]
    assert list(figure.data[0].x) == [0.0, 0.25, 0.5] and list(figure.data[0].y) == [0.0, 0.0, 1.0]  # points
    assert list(figure.data[1].y) == [0.0, 10.0, 30.0, 60.0]
    assert figure.layout.shapes[0].y0 == 5.0 and figure.layout.yaxis.ticksuffix == " pts"
    fidelity = figures.sensitivity_curves(_scan_dict({"a": [0.1]}, order=["a"], measure="cosine"))
    assert list(fidelity.data[0].y) == [0.0, 0.1] and not fidelity.layout.yaxis.ticksuffix
    assert [trace.name for trace in figures.sensitivity_curves(scan, units=["a"]).data] == ["a"]


def interval_runs():
    """Three unstructured runs: tight around 1x, tight away from 1x, noisy; and one stored before intervals."""
    common = dict(model_name="lenet5", dataset="digits", structure="unstructured", criterion="magnitude",
                  scope="global", sparsity=0.9)
    return [Run(**common, id=1, name="tight", metrics={"speedup_measured": 1.01, "speedup_interval": [0.98, 1.03],
                                                       "speedup_noisy": False, "speedup_flops": 5.0}),
            Run(**common, id=2, name="away", metrics={"speedup_measured": 1.2, "speedup_interval": [1.15, 1.24],
                                                      "speedup_noisy": False, "speedup_flops": 5.0}),
            Run(**common, id=3, name="noisy", metrics={"speedup_measured": 0.9, "speedup_interval": [0.4, 2.1],
                                                       "speedup_noisy": True, "speedup_flops": 5.0}),
            Run(**common, id=4, name="old", metrics={"speedup_measured": 0.98, "speedup_flops": 5.0})]


def test_runs_frame_and_speedup_chart_carry_each_runs_interval():
    table = figures.runs_frame(interval_runs())
    assert table["measured 95 % low"].tolist()[:3] == [0.98, 1.15, 0.4]
    assert table["measured 95 % high"].tolist()[:3] == [1.03, 1.24, 2.1]
    assert table["noisy"].tolist()[:3] == [False, False, True] and pd.isna(table["measured 95 % low"].iloc[3])
    figure = figures.speedup_promise(table)
    bars = {}
    for trace in figure.data[:-1]:
        for name, y, up, down in zip(trace.hovertext, trace.y, trace.error_y.array, trace.error_y.arrayminus):
            bars[name] = (y - down, y + up, trace.marker.symbol)
    assert bars["tight"][:2] == pytest.approx((0.98, 1.03)) and bars["noisy"][:2] == pytest.approx((0.4, 2.1))
    assert bars["old"][:2] == pytest.approx((0.98, 0.98)), "no interval stored: no bar"
    assert (bars["tight"][2], bars["noisy"][2], bars["old"][2]) == ("circle", "circle-open", "diamond")
    assert figure.layout.yaxis.range[1] >= 2.1, "the whole noisy bar is on the chart"


def test_unstructured_summary_counts_what_the_chart_shows():
    text = figures.unstructured_speedup_summary(figures.runs_frame(interval_runs()))
    assert text.startswith("Unstructured runs shown: medians 0.90-1.20x measured; 2 of 3 with an interval have "
                           "1x inside it; 1 noisy")
    assert "1 stored before intervals were measured" in text
    channel = [Run(model_name="lenet5", dataset="digits", structure="channel", criterion="magnitude", scope="local",
                   sparsity=0.5, id=9, name="c", metrics={"speedup_measured": 1.5, "speedup_flops": 2.0})]
    assert figures.unstructured_speedup_summary(figures.runs_frame(channel)) == ""


def test_cost_bars_draw_the_measured_interval_and_mark_noise():
    rows = [{"label": "unstructured 90 %", "speedup_flops": 5.0, "speedup_measured": 1.0,
             "speedup_interval": [0.95, 1.04], "speedup_noisy": False, "compression_ratio": 4.0},
            {"label": "channel 50 %", "speedup_flops": 3.0, "speedup_measured": 1.4,
             "speedup_interval": [0.5, 2.5], "speedup_noisy": True, "compression_ratio": 2.0}]
    measured = figures.cost_side_by_side(rows).data[1]
    assert list(measured.error_y.array) == pytest.approx([0.04, 1.1])
    assert list(measured.error_y.arrayminus) == pytest.approx([0.05, 0.9])
    assert list(measured.text) == ["1.00x", "noisy"] and list(measured.marker.pattern.shape) == ["", "/"]


def test_trajectories_plot_a_transformers_own_metric_where_it_has_no_accuracy():
    point = {"sparsity": 0.5, "val_accuracy": None, "metric": "perplexity"}
    figure = figures.trajectories({"one_shot": [{**point, "epoch": 0, "val_metric": None},
                                                {**point, "epoch": 1, "val_metric": 900.0},
                                                {**point, "epoch": 2, "val_metric": 450.0}]})
    assert figure.layout.annotations[0].text == "validation perplexity"
    assert list(figure.data[0].y) == [900.0, 450.0] and figure.layout.yaxis.type == "log"
    assert list(figure.data[1].y) == [0.5, 0.5, 0.5] and tuple(figure.layout.yaxis2.range) == (0, 1.02)
    accuracy = figures.trajectories({"a": [{"epoch": 1, "sparsity": 0.9, "val_accuracy": 0.8, "metric": "accuracy",
                                            "val_metric": 0.8}]})
    assert accuracy.layout.annotations[0].text == "validation accuracy" and list(accuracy.data[0].y) == [0.8]
    assert tuple(accuracy.layout.yaxis.range) == (0, 1.02)


def test_perplexities_scored_on_different_tokens_are_different_metrics():
    """A run's perplexity label says what it read, so Compare never puts 1,020-token and whole-split runs on one axis."""
    common = dict(model_name="gpt2", dataset="text", structure="unstructured", criterion="wanda", scope="local",
                  sparsity=0.5)

    def run(id, tokens=None, budget=None):
        task = {"name": "perplexity", "measure": "perplexity", "base": 30.0, "pruned": 40.0}
        return Run(**common, id=id, metrics={"task": {**task, **({"tokens": tokens} if tokens else {})}},
                   recipe={"measure": {"eval_tokens": budget}})

    table = figures.runs_frame([run(1, {"scored": 1020, "total": 8607}), run(2, {"scored": 8607, "total": 8607}),
                                run(3, budget=None), run(4, budget=2048), run(5, {"scored": 1020, "total": 8607})])
    assert list(table["metric"]) == ["perplexity · first 1,020 of 8,607 tokens", "perplexity · all 8,607 tokens",
                                     "perplexity · all tokens", "perplexity · first <= 2,048 tokens",
                                     "perplexity · first 1,020 of 8,607 tokens"]
    assert {figures.metric_kind(label) for label in table["metric"]} == {"perplexity"}
    figure = figures.accuracy_vs_sparsity(table, table["metric"][0])
    assert figure.layout.yaxis.title.text == "perplexity · first 1,020 of 8,607 tokens (lower is better)"
    assert sorted(y for trace in figure.data for y in trace.y if y == y) == [40.0, 40.0]  # runs 1 and 5 only
