"""The models people prune: torchvision's classification set through the explorer, next to torch-pruning's own result.

Per model (random weights, 1 x 3 x 224 x 224 inputs, eval mode) first the compatibility report
(`explorer.compat.report`: what it says of channel and head pruning, and how long it took, trace included),
then per structure (unstructured 50 % local, channel 50 % local, head 50 % local) the explorer's own chain:
refused with the one-line reason (`compat.refusal`, then `pipeline.prepare`, which traces before any
scoring), or scored (magnitude), planned and pruned, with parameter and FLOP ratios (dense / pruned) and the
seconds `prepare` took (trace + scoring). Beside it, torch-pruning's own ``MetaPruner`` (L1 magnitude, 50 %
channels, its ``ignored_layers`` = the last Linear) on the same model: its parameter and FLOP ratios, or its
error, or that it did not finish within the trace limit.

Each model runs in a child process under ``--model-limit`` seconds (default 300), so one model cannot hold the
machine; torch-pruning's trace is bounded by ``PRUNING_EXPLORER_TRACE_LIMIT`` (``--trace-limit``, default 60
here) in the explorer and in the MetaPruner column alike.

torchvision is an optional dependency (it needs a matching torch; not installed in the project's
environment): without it the script says so and stops. ``--zoo`` runs the zoo's ``vit_small`` instead, which
exercises the same code without torchvision.

Run from the repository root: ``python -m bench.bench_models [--models resnet18,vit_b_16] [--zoo]``;
writes ``bench/RESULTS_models.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

from bench.common import cpu_model
from explorer import compat, deadline, measure, pipeline, zoo
from explorer.errors import ExplorerError
from explorer.specs import PlanSpec, ScoringSpec

TORCHVISION_SET = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "alexnet",
                   "squeezenet1_0", "googlenet", "inception_v3", "densenet121", "mobilenet_v2",
                   "mobilenet_v3_large", "mnasnet1_0", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
                   "convnext_tiny", "vit_b_16", "shufflenet_v2_x1_0", "swin_t", "maxvit_t")
STRUCTURES = ("unstructured", "channel", "head")


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _one_line(text: str, limit: int = 160) -> str:
    line = text.splitlines()[0] if text else ""
    return (line[:limit] + "...") if len(line) > limit else line


def explorer_row(model, example, structure: str) -> dict:
    """Our verdict and numbers for one structure: refused (with the one-line reason) or pruned at 50 %."""
    reason = compat.refusal(model, structure)
    if reason is not None:
        return {"verdict": f"refused: {_one_line(reason)}"}
    started = time.perf_counter()
    try:
        prepared = pipeline.prepare(model, ScoringSpec(structure, "magnitude"), example_input=example)
        scoring_s = time.perf_counter() - started
        pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(0.5, "local")))
    except ExplorerError as error:
        return {"verdict": f"refused: {_one_line(str(error))}", "scoring_s": f"{time.perf_counter() - started:.1f}"}
    dense, after = measure.count_params(model), measure.count_params(pruned)
    flops_dense, flops_after = measure.flops(model, example), measure.flops(pruned, example)
    params_after = after["nonzero"] if structure == "unstructured" else after["total"]
    with torch.no_grad():
        pruned(example)  # the pruned copy runs
    return {"verdict": "ok", "params": _ratio(dense["total"], params_after),
            "flops": _ratio(flops_dense["dense"], flops_after["effective"]), "scoring_s": f"{scoring_s:.1f}"}


def torch_pruning_row(model, example) -> str:
    """torch-pruning's MetaPruner at 50 % channels (L1 magnitude): its parameter and FLOP ratios, or its error."""
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    classifier = [m for m in work.modules() if isinstance(m, torch.nn.Linear)][-1:]
    limit = deadline.trace_limit()
    started = time.perf_counter()
    try:
        flops_before, params_before = tp.utils.count_ops_and_params(work, example)

        def prune():
            pruner = tp.pruner.MetaPruner(work, example, importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=0.5, ignored_layers=classifier)
            pruner.step()

        with deadline.limit(limit):
            prune()
        with torch.no_grad():
            work(example)
        flops_after, params_after = tp.utils.count_ops_and_params(work, example)
        return (f"ok {params_before / params_after:.2f}x params, {flops_before / flops_after:.2f}x FLOPs "
                f"({time.perf_counter() - started:.0f} s)")
    except deadline.TimeLimit:
        return f"did not finish within {limit:g} s"
    except Exception as error:  # noqa: BLE001 - what it raises is the result
        return f"fails: {type(error).__name__}: {_one_line(str(error), 80)}"


def build(name: str, use_zoo: bool):
    if use_zoo:
        return zoo.build(name, (3, 32, 32), 8).eval(), torch.randn(1, 3, 32, 32)
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval(), torch.randn(1, 3, 224, 224)


def report_cell(model, example) -> tuple[str, str]:
    """What the compatibility report says of channel and head pruning (one line each), and its seconds."""
    started = time.perf_counter()
    try:
        result = compat.report(model, example, calib_batches=1, calib_batch_size=1)
    except ExplorerError as error:
        return f"fails: {_one_line(str(error))}", f"{time.perf_counter() - started:.1f}"
    said = []
    for name in ("channel", "head"):
        entry = result["structures"][name]
        said.append(f"{name} {len(entry['units'])} units" if entry["ok"] else f"{name} refused")
    return ", ".join(said), f"{time.perf_counter() - started:.1f}"


def model_rows(name: str, use_zoo: bool) -> list[dict]:
    model, example = build(name, use_zoo)
    said, report_s = report_cell(model, example)
    theirs = torch_pruning_row(model, example)
    rows = []
    for structure in STRUCTURES:
        row = explorer_row(model, example, structure)
        rows.append({"model": name, "structure": structure, **row, "report": said if structure == "unstructured" else "",
                     "report_s": report_s if structure == "unstructured" else "",
                     "theirs": theirs if structure == "channel" else ""})
    return rows


def _line(row: dict) -> str:
    return (f"| {row['model']} | {row['structure']} | {row.get('report', '')} | {row.get('report_s', '')} | "
            f"{row['verdict']} | {row.get('params', '-')} | {row.get('flops', '-')} | {row.get('scoring_s', '-')} | "
            f"{row.get('theirs', '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: the whole set)")
    parser.add_argument("--zoo", action="store_true", help="run the zoo's vit_small instead of torchvision's set")
    parser.add_argument("--model-limit", type=float, default=300.0, help="seconds per model (a child process each)")
    parser.add_argument("--trace-limit", type=float, default=60.0, help="seconds for one torch-pruning trace")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one model, JSON rows out
    parser.add_argument("--out", default="bench/RESULTS_models.md")
    args = parser.parse_args(argv)
    os.environ.setdefault(deadline.ENV, f"{args.trace_limit:g}")
    if args.one:
        for row in model_rows(args.one, args.zoo):
            print("ROW " + json.dumps(row), flush=True)
        return 0
    if not args.zoo:
        try:
            import torchvision
        except ImportError:
            print("torchvision is not importable here: skipped (install torch and a matching torchvision in a "
                  "separate venv, or pass --zoo).")
            return 0
    names = args.models.split(",") if args.models else (["vit_small"] if args.zoo else list(TORCHVISION_SET))
    versions = f"torch {torch.__version__}" + ("" if args.zoo else f", torchvision {torchvision.__version__}")
    lines = [f"# The models people prune ({'zoo' if args.zoo else 'torchvision'} set)", "",
             f"{cpu_model()}, {os.cpu_count()} cores, {versions}, Python {platform.python_version()}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.1f} at the start. "
             f"Random weights, 1x3x224x224 (zoo: 32x32), magnitude scores, 50 % local; a trace limit of "
             f"{os.environ[deadline.ENV]} s, {args.model_limit:g} s per model.", "",
             "| model | structure | report says | report s | explorer | params (dense / pruned) | FLOPs | prepare s | "
             "torch-pruning, 50 % channels |",
             "|---|---|---|---|---|---|---|---|---|"]
    started = time.perf_counter()
    for name in names:
        command = [sys.executable, "-m", "bench.bench_models", "--one", name] + (["--zoo"] if args.zoo else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.model_limit, env=os.environ)
            rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if not rows:
                rows = [{"model": name, "structure": "-", "verdict": f"bench failed: {_one_line(done.stderr[-300:])}"}]
        except subprocess.TimeoutExpired:
            rows = [{"model": name, "structure": "-", "verdict": f"did not finish within {args.model_limit:g} s"}]
        for row in rows:
            lines.append(_line(row))
            print(lines[-1], flush=True)
    lines += ["", f"Whole run {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f} at the end."]
    with open(args.out, "w") as out:
        out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
