"""The models people prune: torchvision's classification set through the explorer, next to torch-pruning's own result.

Per model (random weights, 1 x 3 x 224 x 224 inputs) and structure (unstructured 50 % local, channel 50 %
local, head 50 % local where the model has attention): first the compatibility report's verdict
(`explorer.compat`), then, when the structure is served, scoring (magnitude), the plan and the pruned
copy; the row holds ok / refused-with-reason, parameter and FLOP ratios (dense / pruned) and the scoring
time. Beside it, torch-pruning's own ``MetaPruner`` (magnitude importance, 50 % channels, its
``ignored_layers`` = the classifier) on the same model: its parameter ratio, or its error.

torchvision is an optional dependency (it needs a matching torch; not installed in the project's
environment): without it the script says so and stops. ``--zoo`` runs the zoo's ``vit_small`` instead, which
exercises the same code without torchvision.

Run from the repository root: ``python -m bench.bench_models [--models resnet18,vit_b_16] [--zoo]``;
writes ``bench/RESULTS_models.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from bench.common import cpu_model
from explorer import compat, measure, pipeline, zoo
from explorer.errors import ExplorerError
from explorer.specs import PlanSpec, ScoringSpec

TORCHVISION_SET = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "alexnet",
                   "squeezenet1_0", "googlenet", "inception_v3", "densenet121", "mobilenet_v2",
                   "mobilenet_v3_small", "mnasnet1_0", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
                   "convnext_tiny", "shufflenet_v2_x1_0", "vit_b_16", "swin_t", "maxvit_t")
STRUCTURES = ("unstructured", "channel", "head")


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def explorer_row(model, example, structure: str) -> dict:
    """Our verdict and numbers for one structure: refused (with the one-line reason) or pruned at 50 %."""
    reason = compat.refusal(model, structure)
    if reason is not None:
        return {"verdict": f"refused: {reason}"}
    started = time.perf_counter()
    try:
        prepared = pipeline.prepare(model, ScoringSpec(structure, "magnitude"), example_input=example)
        scoring_s = time.perf_counter() - started
        pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(0.5, "local")))
    except ExplorerError as error:
        return {"verdict": f"refused: {str(error).splitlines()[0]}"}
    dense, after = measure.count_params(model), measure.count_params(pruned)
    flops_dense, flops_after = measure.flops(model, example), measure.flops(pruned, example)
    params_after = after["nonzero"] if structure == "unstructured" else after["total"]
    return {"verdict": "ok", "params": _ratio(dense["total"], params_after),
            "flops": _ratio(flops_dense["dense"], flops_after["effective"]), "scoring_s": f"{scoring_s:.1f}"}


def torch_pruning_row(model, example) -> str:
    """torch-pruning's MetaPruner at 50 % channels (magnitude), its parameter ratio or its error."""
    import copy

    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    classifier = [m for m in work.modules() if isinstance(m, torch.nn.Linear)][-1:]
    try:
        before = sum(p.numel() for p in work.parameters())
        pruner = tp.pruner.MetaPruner(work, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=classifier)
        pruner.step()
        work(example)
        return f"ok {before / sum(p.numel() for p in work.parameters()):.2f}x params"
    except Exception as error:  # noqa: BLE001 - what it raises is the result
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"


def build(name: str, use_zoo: bool):
    if use_zoo:
        return zoo.build(name, (3, 32, 32), 8).eval(), torch.randn(1, 3, 32, 32)
    import torchvision

    size = 299 if name == "inception_v3" else 224
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval(), torch.randn(1, 3, size, size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: the whole set)")
    parser.add_argument("--zoo", action="store_true", help="run the zoo's vit_small instead of torchvision's set")
    parser.add_argument("--out", default="bench/RESULTS_models.md")
    args = parser.parse_args(argv)
    if not args.zoo:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print("torchvision is not importable here: skipped (install torch and a matching torchvision in a "
                  "separate venv, or pass --zoo).")
            return 0
    names = args.models.split(",") if args.models else (["vit_small"] if args.zoo else list(TORCHVISION_SET))
    lines = [f"# The models people prune ({'zoo' if args.zoo else 'torchvision'} set)", "",
             f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.1f} at the start. "
             "Random weights, magnitude scores, 50 % local.", "",
             "| model | structure | explorer | params (dense / pruned) | FLOPs | scoring s | torch-pruning, 50 % channels |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        model, example = build(name, args.zoo)
        theirs = torch_pruning_row(model, example)
        for structure in STRUCTURES:
            row = explorer_row(model, example, structure)
            lines.append(f"| {name} | {structure} | {row['verdict']} | {row.get('params', '-')} | "
                         f"{row.get('flops', '-')} | {row.get('scoring_s', '-')} | {theirs if structure == 'channel' else ''} |")
            print(lines[-1], flush=True)
    with open(args.out, "w") as out:
        out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
