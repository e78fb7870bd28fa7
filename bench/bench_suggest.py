"""Does the suggested recipe beat uniform local and plain global pruning at the same overall sparsity?

For each case the sensitivity scan runs on the **validation** split (``--samples`` examples), `suggest`
picks per-unit sparsities for a target overall sparsity, and the suggestion is applied and evaluated on
the **test** split (all of it), as ``python -m explorer run`` would report it. Its measured sparsity (the
fraction of the prunable weights that are gone: `run`'s ``sparsity_actual``) is then matched by:

* **uniform local**: every unit at the same sparsity (`PlanSpec(scope="local")`);
* **plain global**: one threshold over all units (`PlanSpec(scope="global")`, no ``min_keep``), which may
  empty a layer (then it cannot be applied: the table says "collapsed").

For unstructured pruning the requested sparsity is the matched one (both round per layer or over the
pool); for channel groups a requested fraction of channels removes more weights than that (a layer
loses input and output channels), so the requested sparsity is bisected until the applied model's
measured sparsity is the suggestion's (within the plans' granularity: the table gives each measured value).

Cases (no fine-tuning anywhere; the trained, cached zoo baselines; the built-in MiniLM):

* lenet5 / digits, unstructured magnitude, targets 0.8 and 0.9 (metric: accuracy);
* resnet20 / shapes, channel magnitude (filter L1), target 0.5 (accuracy);
* minilm / text, unstructured magnitude, target 0.5 (metric: fidelity, cosine to the dense embeddings).

Run from the repository root: ``python -m bench.bench_suggest [--only lenet5]``; writes
``bench/RESULTS_suggest.md`` (``--only`` prints its rows without writing).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import cpu_model
from explorer import pipeline, sensitivity, tasks
from explorer.layers import prunable_counts
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec
from explorer.suggest import evaluate, suggest

RESULTS = Path(__file__).with_name("RESULTS_suggest.md")


@dataclass
class Case:
    name: str
    model: ModelSpec
    scoring: ScoringSpec
    targets: tuple[float, ...]
    samples: int | None
    sparsities: tuple[float, ...] = sensitivity.DEFAULT_SPARSITIES


CASES = [  # minilm: 37 Linear units; each cell runs the pruned and the dense encoder, so a short grid and subset
    Case("lenet5", ModelSpec(source="lenet5", data="digits", baseline=True), ScoringSpec(), (0.8, 0.9), None),
    Case("minilm", ModelSpec(source="minilm", data="text"), ScoringSpec(), (0.5,), 32, (0.3, 0.5, 0.7, 0.9)),
    Case("resnet20", ModelSpec(source="resnet20", data="shapes", baseline=True), ScoringSpec(structure="channel"),
         (0.5,), 512),
]


def load() -> float:
    return os.getloadavg()[0]


def measured_sparsity(model, pruned) -> float:
    return 1 - prunable_counts(pruned)[0] / max(1, prunable_counts(model)[1])


def test_value(model, pruned, dataset, task, measure) -> float:
    return tasks.evaluate_task(pruned, dataset, reference=model, task=task, split="test",
                               measure=measure if task == "fidelity" else None)["value"]


def matched(model, prepared, scope: str, target: float) -> tuple[object | None, float, float]:
    """The plan of ``scope`` whose applied model has the measured sparsity closest to ``target``:
    (pruned model or None if it collapses, requested sparsity, measured sparsity)."""
    def attempt(requested):
        plan = pipeline.preview(prepared, PlanSpec(sparsity=requested, scope=scope))
        if plan.collapsed:
            return None, requested, plan.sparsity_actual
        pruned = pipeline.apply(model, prepared, plan)
        return pruned, requested, measured_sparsity(model, pruned)

    if prepared.structure == "unstructured":
        return attempt(target)
    low, high, best = 0.0, 0.99, None
    for _ in range(20):
        middle = (low + high) / 2
        result = attempt(middle)
        if best is None or abs(result[2] - target) < abs(best[2] - target):
            best = result
        if result[2] < target:
            low = middle
        else:
            high = middle
    return best


def run_case(case: Case) -> list[dict]:
    started = time.perf_counter()
    model, dataset, _ = pipeline.resolve_model(case.model.validate(), seed=0)
    task = tasks.task_for(model, dataset)
    prepared = pipeline.prepare(model, case.scoring, dataset=dataset, seed=0)
    prepare_s = time.perf_counter() - started
    load_before = load()
    scan = sensitivity.scan(model, dataset, case.scoring, sparsities=case.sparsities, split="val",
                            samples=case.samples, prepared=prepared)
    measure = scan.measure
    dense = test_value(model, model, dataset, task, measure)
    rows = []
    for target in case.targets:
        begun = time.perf_counter()
        suggestion = suggest(scan, target_sparsity=target, prepared=prepared)
        suggest_s = time.perf_counter() - begun
        on_test = evaluate(model, dataset, prepared, suggestion, split="test")
        on_val = evaluate(model, dataset, prepared, suggestion, split="val", samples=case.samples)
        reached = on_test.actual["sparsity"]
        row = {"case": case, "target": target, "dense": dense, "measure": measure, "scan_s": scan.seconds,
               "prepare_s": prepare_s, "suggest_s": suggest_s, "units": len(scan.units),
               "grid": len(scan.sparsities), "samples": scan.samples, "suggested": on_test.actual["value"],
               "sparsity": reached, "predicted": suggestion.predicted, "val_actual": on_val.actual,
               "sparsities": suggestion.sparsities, "load": (load_before, load())}
        for scope in ("local", "global"):
            pruned, requested, measured = matched(model, prepared, scope, reached)
            row[scope] = {"value": None if pruned is None else test_value(model, pruned, dataset, task, measure),
                          "requested": requested, "sparsity": measured}
        rows.append(row)
        print(f"{case.name} {target}: suggested {row['suggested']:.4f} at {reached:.3f}, local "
              f"{row['local']['value']}, global {row['global']['value']} (load {load():.2f})", flush=True)
    return rows


def _value(entry: dict) -> str:
    return "collapsed" if entry["value"] is None else f"{entry['value']:.4f} ({entry['sparsity']:.1%})"


def write(rows: list[dict], seconds: float) -> str:
    loads = [value for row in rows for value in row["load"]]
    lines = [
        "# Suggested recipe vs uniform local vs plain global, at the same overall sparsity",
        "",
        "`python -m bench.bench_suggest` (this file is its output). The scan runs on the validation split, the "
        "suggestion and both baselines are evaluated on the whole test split, no fine-tuning; the baselines are "
        "matched to the suggestion's measured sparsity (fraction of the prunable weights gone, as `run` reports "
        "it). Higher is better for both metrics (accuracy; fidelity = mean cosine to the dense model).",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device cpu",
        f"- load average (1 min) before and after each scan / row: min {min(loads):.2f}, max {max(loads):.2f} "
        "(the machine is shared by several agents; load slows the times, not the metrics)",
        f"- whole run: {seconds:.0f} s",
        "",
        "| model (data), structure criterion | target | suggested (measured sparsity) | uniform local | plain global "
        "| dense | predicted drop (val) | actual drop (val) | scan, s (units x ratios, samples) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        case = row["case"]
        lines.append(
            f"| {case.name} ({case.model.data}), {case.scoring.structure} {case.scoring.criterion} "
            f"({row['measure']}) | {row['target']:.2f} | **{row['suggested']:.4f}** ({row['sparsity']:.1%}) | "
            f"{_value(row['local'])} | {_value(row['global'])} | {row['dense']:.4f} | "
            f"{row['predicted']['drop']:.4f} | {row['val_actual']['drop']:.4f} | {row['scan_s']:.1f} "
            f"({row['units']} x {row['grid']}, {row['samples']}) |")
    lines += ["", "Per-unit sparsities of each suggestion:", ""]
    for row in rows:
        chosen = ", ".join(f"{unit} {value:.0%}" for unit, value in row["sparsities"].items())
        lines.append(f"- {row['case'].name} at {row['target']:.2f}: {chosen}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[case.name for case in CASES])
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    rows = [row for case in CASES if args.only in (None, case.name) for row in run_case(case)]
    text = write(rows, time.perf_counter() - started)
    if args.only:
        print(text)
    else:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
