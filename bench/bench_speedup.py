"""Does FLOPs speed-up turn into measured speed-up? Structured vs unstructured, 50 %.

A ResNet-18-shaped network (defined here; no torchvision), 3x224x224, on CPU:

* structured: 50 % of every channel group removed (filter L1 magnitude, local scope)
  through ``explorer.structural.apply`` -- the network really gets thinner;
* unstructured: 50 % of every conv/linear weight set to zero in place on a copy -- same
  shapes, dense kernels, so no measured gain is expected.

Both are timed against the dense model alternately, pair by pair, with the same batch and threads
(`measure.compare_latency`: the median ratio and its 95 % interval).
Run from the repository root: ``python -m bench.bench_speedup [--batch 1] [--threads N] [--min-run-time 3]``;
it prints a Markdown table (paste it into ``bench/RESULTS_speedup.md``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os

import torch
import torch.nn as nn

from bench.common import ResNet18, cpu_model
from explorer import criteria, measure, planner, structural
from explorer.timing import speedup_text


def timing_text(timed: dict) -> str:
    return speedup_text({"speedup_measured": timed["speedup_measured"], "speedup_interval": timed["speedup_interval"],
                         "speedup_noisy": timed["noisy"]}) + f", {timed['pairs']} pairs in {timed['seconds']:.1f} s"


def structured_half(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """50 % of every channel group, lowest filter-L1 first (local scope), removed."""
    groups = structural.channel_groups(model, example)
    scores = structural.group_scores(model, groups, criteria.channel_scores(model, "magnitude", norm="l1"))
    ranking = planner.prepare(scores)
    return structural.apply_plan(model, planner.plan(ranking, 0.5, "local"), ranking, example)


def unstructured_half(model: nn.Module) -> nn.Module:
    """A copy with the 50 % smallest |w| of every conv/linear weight set to zero."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for module in zeroed.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                threshold = module.weight.abs().flatten().kthvalue(module.weight.numel() // 2).values
                module.weight[module.weight.abs() <= threshold] = 0
    return zeroed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--min-run-time", type=float, default=6.0, help="least seconds of timing per pair of models")
    parser.add_argument("--max-run-time", type=float, default=30.0,
                        help="most seconds of timing per pair, if the speed-up's interval is not within 5 %% by then")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last",
                        help="memory format of both models and the input (the app measures channels_last)")
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = ResNet18().eval()
    with torch.no_grad():  # non-trivial BN statistics and weights of varied scale
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_var.uniform_(0.5, 2.0)
    example = torch.randn(args.batch, 3, 224, 224)
    structured = structured_half(dense, example)
    unstructured = unstructured_half(dense)

    channels_last = args.layout == "channels_last"
    dense_flops = measure.flops(dense, example)["dense"]
    rows = []
    for label, model in (("structured 50 % (channels removed)", structured),
                         ("unstructured 50 % (zeros in place)", unstructured)):
        model_flops = measure.flops(model, example)
        timing = measure.compare_latency(dense, model, example, threads=args.threads,
                                         min_run_time=args.min_run_time, max_run_time=args.max_run_time,
                                         channels_last=channels_last)
        flops_speedup = dense_flops / model_flops["effective"]
        rows.append((label, measure.count_params(model), model_flops, timing, flops_speedup))

    print(f"- date: {datetime.date.today().isoformat()}")
    print(f"- machine: {cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}, threads {args.threads}, batch {args.batch}, input 3x224x224, "
          f"{args.layout}, device cpu")
    print(f"- dense: {measure.count_params(dense)['total'] / 1e6:.2f} M params, {dense_flops / 1e9:.2f} GFLOPs "
          "(FlopCounterMode, 2 FLOPs per MAC)\n")
    print("| variant | params (non-zero) | GFLOPs dense / effective | dense ms (IQR) | pruned ms (IQR) "
          "| FLOPs speed-up | measured speed-up (95 % interval) | measured / FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for label, params, model_flops, timing, flops_speedup in rows:
        measured = timing["speedup_measured"]
        print(f"| {label} | {params['total'] / 1e6:.2f} M ({params['nonzero'] / 1e6:.2f} M) "
              f"| {model_flops['dense'] / 1e9:.2f} / {model_flops['effective'] / 1e9:.2f} "
              f"| {timing['dense']['median_ms']:.1f} ({timing['dense']['iqr_ms']:.1f}) "
              f"| {timing['pruned']['median_ms']:.1f} ({timing['pruned']['iqr_ms']:.1f}) "
              f"| {flops_speedup:.2f}x | {timing_text(timing)} | {measured / flops_speedup:.2f} |")


if __name__ == "__main__":
    main()
