"""Deployment truth (issue 19): runtimes side by side, CSR break-even, prune-then-int8, export round trips.

One run per row, on this machine, with its load stated. Sections (``--sections``, comma-separated):

* ``runtimes``  ResNet-18 layout at 224x224, 50 % of channels removed (local filter-L1, as bench_speedup):
  eager vs torch.compile vs ONNX Runtime, batch 1 and 64, measured / FLOPs per runtime
  (`deploy.runtimes.compare_runtimes`, the paired timing of `explorer.timing`);
* ``sparse``    a 27.5 M-parameter MLP (1024-4096-4096-1600-10) at 95 % unstructured (local magnitude):
  the break-even sparsity per Linear shape at batch 1 (`deploy.sparse.break_even`) and the model with
  CSR where it wins, end to end against dense kernels at batch 1 (`deploy.sparse.end_to_end`);
* ``int8``      lenet5 (digits) and resnet20 (shapes), trained baselines, 50 % of channels removed and
  fine-tuned 3 epochs, then ONNX Runtime dynamic int8: size, latency, accuracy (`deploy.quantize.compare`);
* ``export``    every zoo model dense, 50 % masked and 50 % channel-pruned, and MiniLM: ONNX, TorchScript and
  .pt2, each reloaded and compared (`deploy.export.export_all`): max abs difference.

Each section replaces its own block in bench/RESULTS_deploy.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.bench_speedup import structured_half
from bench.common import ResNet18, cpu_model
from explorer import pipeline, timing
from explorer.deploy import export, quantize, runtimes, sparse
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec
from explorer.train import TrainConfig, train
from explorer.zoo import ZOO

RESULTS = Path(__file__).with_name("RESULTS_deploy.md")
RUNTIMES = ("eager", "compile", "onnxruntime")  # the runtimes section's, set by --runtimes
BATCHES = (1, 64)                               # and its batch sizes, set by --batches
INT8_MODELS = (("lenet5", "digits"), ("resnet20", "shapes"))  # the int8 section's (model, data), --int8-models


def machine_line() -> str:
    load = timing.machine_load()
    return (f"- {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {cpu_model()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}; load at start: {os.getloadavg()[0]:.1f} "
            f"(1-min average), {load.others_runnable} other runnable task(s)")


def interval(row: dict) -> str:
    low, high = row["speedup_interval"]
    text = f"{row['speedup']:.2f}x ({low:.2f}-{high:.2f})"
    return f"noisy: {text}" if row["noisy"] else text


def section_runtimes(max_run_time: float) -> list[str]:
    torch.manual_seed(0)
    dense = ResNet18().eval()
    example = torch.randn(max(BATCHES), 3, 224, 224)
    pruned = structured_half(dense, example[:2]).eval()
    result = runtimes.compare_runtimes(dense, pruned, example, runtimes=RUNTIMES, batches=BATCHES,
                                       max_run_time=max_run_time)
    lines = [f"FLOPs speed-up {result['speedup_flops']:.2f}x ({result['flops']['dense']:,} -> "
             f"{result['flops']['pruned']:,} FLOPs per image); {result['threads']} thread(s)"
             + (f" ({result['threads_note']})" if result["threads_note"] else "") + "; timing at most "
             f"{max_run_time:g} s per row", "",
             "| runtime | batch | dense ms | pruned ms | measured speed-up (95 %) | measured / FLOPs | pairs | "
             "compile / export s (dense, pruned) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row.get("error"):
            lines.append(f"| {row['runtime']} | {row['batch']} | | | {row['error']} | | | |")
            continue
        setup = ", ".join(f"{v:.1f}" for v in row["setup_s"].values()) if row["setup_s"] else "-"
        lines.append(f"| {row['runtime']} | {row['batch']} | {row['dense_ms']:.2f} | {row['pruned_ms']:.2f} | "
                     f"{interval(row)} | {row['measured_over_flops']:.2f} | {row['pairs']} | {setup} |")
    top = max(BATCHES)
    best = max((r["measured_over_flops"] for r in result["rows"] if not r.get("error") and r["batch"] == top),
               default=None)
    lines += ["", f"Best measured / FLOPs at batch {top}: {best:.2f} (the issue's goal: >= 0.85 at batch 64)."
              if best is not None else ""]
    return lines


def mlp_27m() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1600), nn.ReLU(), nn.Linear(1600, 10))


def section_sparse(max_run_time: float) -> list[str]:
    torch.manual_seed(0)
    model = mlp_27m().eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                cut = module.weight.abs().flatten().kthvalue(round(0.95 * module.weight.numel())).values
                module.weight[module.weight.abs() <= cut] = 0
    lines = [f"Model: {params / 1e6:.2f} M parameters (1024-4096-4096-1600-10), 95 % of every Linear's "
             "weights zeroed (local magnitude).", "",
             "Break-even per layer shape, batch 1 (random weights and mask; CSR over dense, median per-pair ratio "
             "and 95 % interval; at most 0.5 s of timing per cell):", "",
             "| shape (out x in) | " + " | ".join(f"{s:.0%}" for s in sparse.SPARSITIES) + " | break-even |",
             "|---|" + "---|" * (len(sparse.SPARSITIES) + 1)]
    shapes = list(dict.fromkeys(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)))
    for shape in shapes:
        found = sparse.break_even(shape, batch=1, max_run_time=0.5)
        cells = [interval(row).replace("noisy: ", "~") for row in found["rows"]]
        point = found["break_even"]
        lines.append(f"| {shape[0]} x {shape[1]} | " + " | ".join(cells) + f" | {'never' if point is None else f'{point:.0%}'} |")
    lines += ["", "(~ marks a noisy cell: its interval stayed wider than +-5 %.)", ""]
    x = torch.randn(1, 1024)
    result = sparse.end_to_end(model, x, max_run_time=max_run_time)
    on_csr = [row["name"] for row in result["layers"] if row["sparse"]]
    lines += [f"End to end at batch 1, {result['threads']} thread(s): {result['dense_ms']:.3f} ms on dense kernels, "
              f"{result['sparse_ms']:.3f} ms with CSR in {', '.join(on_csr) or 'no layer'}: "
              f"**{interval(result)}** (goal >= 1.5x); outputs agree to {result['max_abs_diff']:.1e}."]
    return lines


def section_int8(max_run_time: float) -> list[str]:
    lines = ["| model | file | size | x dense fp32 | latency ms (batch 64, ONNX Runtime) | speed-up vs dense "
             "(95 %) | test accuracy |", "|---|---|---|---|---|---|---|"]
    for name, data in INT8_MODELS:
        dense, dataset, _ = pipeline.resolve_model(ModelSpec(source=name, data=data, baseline=True))
        prepared = pipeline.prepare(dense, ScoringSpec(structure="channel"), dataset=dataset)
        pruned = pipeline.apply(dense, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local")))
        tuned = train(pruned, dataset, TrainConfig(epochs=3, lr=1e-3, seed=0), teacher=dense).model.cpu().eval()
        result = quantize.compare(dense, tuned, dataset, batch=64, max_run_time=max_run_time)
        for row in result["rows"]:
            speed = "1x (reference)" if row["model"] == "dense fp32" else interval(row)
            lines.append(f"| {name} ({data}), 50 % channels + 3 epochs | {row['model']} | {row['size_bytes']:,} B | "
                         f"{row['size_vs_dense']:.3f} | {row['latency_ms']:.3f} | {speed} | {row['metric']:.2%} |")
        fp32, int8 = result["rows"][1], result["rows"][2]
        lines.append(f"| | int8 vs fp32 pruned | | | | | {100 * (int8['metric'] - fp32['metric']):+.2f} points |")
    return lines


def section_export() -> list[str]:
    from explorer import hf

    lines = ["| model | pruning | ONNX | TorchScript | .pt2 |", "|---|---|---|---|---|"]
    folder = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    worst = 0.0
    for name in ZOO:
        dense, dataset, _ = pipeline.resolve_model(ModelSpec(source=name, baseline=False))
        example = dataset.example_input(2)
        variants = [("dense", dense)]
        for structure in ("unstructured", "channel"):
            prepared = pipeline.prepare(dense, ScoringSpec(structure=structure), dataset=dataset)
            variants.append((f"{structure} 50 %" + (" (masked)" if structure == "unstructured" else ""),
                             pipeline.apply(dense, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5)))))
        for label, model in variants:
            cells = []
            for item in export.export_all(model, example, folder, stem=f"{name}-{label.split()[0]}"):
                cells.append(item.error[:80] if item.error else f"{item.max_abs_diff:.1e} ({item.size_bytes:,} B, "
                             f"{item.compressed_bytes:,} deflated)")
                worst = max(worst, item.max_abs_diff or 0.0) if not item.error else worst
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    bundle = hf.builtin("minilm")
    from explorer import text

    dataset = text.text_dataset(bundle.tokenizer, seq_len=bundle.model.seq_len)
    cells = []
    for item in export.export_all(bundle.model.eval(), dataset.example_input(2), folder, stem="minilm"):
        cells.append(item.error[:80] if item.error else f"{item.max_abs_diff:.1e} ({item.size_bytes:,} B)")
        worst = max(worst, item.max_abs_diff or 0.0) if not item.error else worst
    lines.append("| MiniLM (all-MiniLM-L6-v2) | dense | " + " | ".join(cells) + " |")
    lines += ["", f"Largest max abs difference over every file: {worst:.1e} (goal <= 1e-4). Each file was checked on "
                  "the export batch (2) and on batch 3 (dynamic batch axis)."]
    return lines


def section_rounding(max_run_time: float) -> list[str]:
    from explorer import criteria, measure, planner, structural

    torch.manual_seed(0)
    dense = ResNet18().eval()
    example = torch.randn(8, 3, 112, 112)
    groups = structural.channel_groups(dense, example[:2])
    scores = structural.group_scores(dense, groups, criteria.channel_scores(dense, "magnitude", norm="l1"))
    ranking = planner.prepare(scores)
    plan = planner.plan(ranking, 0.45, "local")
    plain = structural.apply_plan(dense, plan, ranking, example[:2]).eval()
    plain_flops = measure.flops(plain, example[:1])["effective"]
    lines = ["ResNet-18 layout at 112x112, batch 8, 45 % of channels removed (local filter-L1), so kept counts are "
             "35, 70, 141, 282: each rounded plan timed against the unrounded one in the same call "
             "(`measure.compare_latency`, eager, channels-last).", "",
             "| kept channels rounded to | kept per stage | FLOPs vs unrounded | measured speed-up over unrounded (95 %) "
             "| measured / FLOPs |", "|---|---|---|---|---|"]
    for multiple in (8, 16, 32):
        rounded_plan = planner.round_kept(plan, multiple, ranking)
        rounded = structural.apply_plan(dense, rounded_plan, ranking, example[:2]).eval()
        flops_ratio = plain_flops / measure.flops(rounded, example[:1])["effective"]
        timed = measure.compare_latency(plain, rounded, example, max_run_time=max_run_time)
        row = {"speedup": timed["speedup_measured"], "speedup_interval": timed["speedup_interval"],
               "noisy": timed["noisy"]}
        kept = sorted({lp.kept for lp in rounded_plan.layers})
        lines.append(f"| {multiple} | {', '.join(map(str, kept))} | {flops_ratio:.3f}x | {interval(row)} | "
                     f"{row['speedup'] / flops_ratio:.2f} |")
    return lines


SECTIONS = {"runtimes": ("ResNet-18 layout, 224x224, 50 % of channels: runtimes side by side", section_runtimes),
            "sparse": ("27.5 M-parameter MLP at 95 % unstructured: CSR kernels vs dense", section_sparse),
            "int8": ("Prune, then quantize: 50 %-channel models, dynamic int8 (ONNX Runtime)", section_int8),
            "export": ("Export round trip: every zoo model and MiniLM", section_export),
            "rounding": ("Hardware-friendly channel counts: the measured effect of rounding kept channels",
                         section_rounding)}


def write(key: str, lines: list[str]) -> None:
    start, end = f"<!-- bench_deploy:{key}:start -->", f"<!-- bench_deploy:{key}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Deployment truth (issue 19)\n\nWritten by `python -m bench.bench_deploy`.\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    RESULTS.write_text(f"{before}{start}\n" + "\n".join(lines) + f"\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    global RUNTIMES, BATCHES, INT8_MODELS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--max-run-time", type=float, default=3.0, help="seconds of timing per row at most")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="the runtimes section's runtimes")
    parser.add_argument("--batches", default="1,64", help="the runtimes section's batch sizes")
    parser.add_argument("--int8-models", default="lenet5:digits,resnet20:shapes", help="the int8 section's MODEL:DATA")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    RUNTIMES = tuple(args.runtimes.split(","))
    BATCHES = tuple(int(b) for b in args.batches.split(","))
    INT8_MODELS = tuple(tuple(pair.split(":")) for pair in args.int8_models.split(","))
    for key in [s.strip() for s in args.sections.split(",") if s.strip()]:
        title, run = SECTIONS[key]
        started = time.perf_counter()
        head = [f"## {title}" + (f" ({args.runtimes.replace(',', ', ')}; batch {args.batches})"
                                 if key == "runtimes" else ""), "", machine_line()]
        body = run() if key == "export" else run(args.max_run_time)
        extra = {"runtimes": f" --runtimes {args.runtimes} --batches {args.batches}",
                 "int8": f" --int8-models {args.int8_models}"}.get(key, "")
        lines = head + [f"- command: `python -m bench.bench_deploy --sections {key} --max-run-time "
                        f"{args.max_run_time:g}{extra}`; {time.perf_counter() - started:.0f} s; load at the end: "
                        f"{os.getloadavg()[0]:.1f}", ""] + body
        print("\n".join(lines), flush=True)
        if not args.no_write:
            write(f"{key}:{args.runtimes}:{args.batches}" if key == "runtimes" else key, lines)


if __name__ == "__main__":
    main()
