"""How long does each importance criterion take on each zoo model? (CPU, fresh weights)

Every criterion x structure (unstructured: ``criteria.weight_scores``; channel:
``criteria.channel_scores``) x zoo model on its usual dataset, with 4 calibration batches of
64 (``Dataset.calibration``), each timed ``--repeats`` times with ``time.perf_counter`` and the
fastest kept (the machine is shared: the minimum is the least disturbed run). Target (issue 8):
every cell under 30 s on a 2-core CPU.

Two side-by-side checks in the same run:

* conductance, ours (every layer in one pass per path chunk) vs the reference it replaced
  (captum's ``LayerConductance`` once per layer per batch), on resnet20 and mobilenetv2_small,
  on the same ``--reference-batches`` batches (default 1: the reference costs about 12 min
  per batch of 64 on mobilenetv2_small; both scale linearly with batches). The largest score
  difference is reported too: the two compute the same numbers.
* SynFlow's layers scored all-zero, ours vs plain ``abs()`` linearisation (the old code).

Run from the repository root: ``python -m bench.bench_criteria [--reference-batches 1]``;
it writes ``bench/RESULTS_criteria.md``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import cpu_model
from explorer import criteria
from explorer.data import load_dataset
from explorer.layers import clone_model, prunable_layers
from explorer.zoo import ZOO, build

STRUCTURES = {"unstructured": criteria.weight_scores, "channel": criteria.channel_scores}
# captum's LayerConductance keeps every path point's activations of a layer; on mobilenetv2_small
# (27 layers x 17 points x 64 images at 32x32) it went past 18 GiB on this 24 GiB machine, so the
# default reference set is the models where it fits (``--reference-models`` to choose).
REFERENCE_MODELS = ("lenet5", "vgg_small", "resnet20")


def captum_conductance_channels(model: nn.Module, calib) -> dict[str, torch.Tensor]:
    """The replaced implementation: captum's LayerConductance, one call per layer per batch."""
    from captum.attr import LayerConductance

    model = clone_model(model).eval()
    sums: dict[str, torch.Tensor] = {}
    examples = 0
    for inputs, labels in calib:
        examples += len(inputs)
        for name, module in prunable_layers(model):
            attribution = LayerConductance(model, module).attribute(inputs, target=labels,
                                                                    n_steps=criteria.CONDUCTANCE_STEPS)
            channel_dim = attribution.dim() - 1 if isinstance(module, nn.Linear) else 1
            per_example = attribution.detach().abs().movedim(channel_dim, -1)
            batch_sum = per_example.reshape(len(inputs), -1, per_example.shape[-1]).mean(dim=1).sum(dim=0)
            sums[name] = sums[name] + batch_sum if name in sums else batch_sum
    return {name: total / examples for name, total in sums.items()}


def plain_abs_synflow_zero_layers(model: nn.Module, input_shape) -> int:
    """Layers left all-zero by the old linearisation: abs() of every tensor, activations kept."""
    copy = clone_model(model).double().eval()
    with torch.no_grad():
        for tensor in copy.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    weights = [module.weight for _, module in prunable_layers(copy)]
    for parameter in copy.parameters():
        parameter.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    flow = copy(torch.ones(1, *input_shape, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(flow, weights, allow_unused=True)
    return sum(1 for weight, grad in zip(weights, grads) if grad is None or not (weight * grad).any())


def timed(fn, *args, repeats: int = 1, **kwargs):
    """``fn``'s result and its fastest wall time over ``repeats`` calls, in seconds."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return result, best


def fresh(name: str, dataset) -> nn.Module:
    torch.manual_seed(0)
    return build(name, dataset.input_shape, dataset.num_classes).eval()


def render(args, rows, reference_rows, synflow_rows, loads) -> str:
    """The results file (Markdown) for whatever has been measured so far."""
    slowest = max((seconds for _, _, cells in rows for _, _, seconds, _, _ in cells), default=0.0)
    lines = [
        "# Importance criteria: wall time per criterion x structure x zoo model (CPU)",
        "",
        "`python -m bench.bench_criteria` (this file is its output). Fresh weights (seed 0), eval mode,",
        f"{args.batches} calibration batches of {args.batch_size} from each model's usual dataset. Each cell is the fastest",
        f"of {args.repeats} calls (`time.perf_counter`, model copy included). *unstr.* = `criteria.weight_scores`,",
        "*chan.* = `criteria.channel_scores`. Data-free criteria ignore the batches.",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        "device cpu",
        f"- load average (1 min) sampled after each measurement: min {min(loads):.2f}, max {max(loads):.2f} "
        "(the machine is shared: above about 1, other work slows every cell)",
        f"- slowest cell: {slowest:.1f} s (target: every cell under 30 s)",
        "",
        "## Seconds per cell",
        "",
        "| model (dataset) | " + " | ".join(f"{c} unstr. / chan." for c in criteria.CRITERIA) + " |",
        "|---|" + "---|" * len(criteria.CRITERIA),
    ]
    for model_name, dataset_name, cells in rows:
        by_criterion: dict[str, list[str]] = {}
        for criterion, _, seconds, _, _ in cells:
            by_criterion.setdefault(criterion, []).append(f"{seconds:.2f}")
        lines.append(f"| {model_name} ({dataset_name}) | " + " | ".join(" / ".join(v) for v in by_criterion.values()) + " |")
    degenerate = [f"{model_name} {criterion} {structure} ({zero_layers}/{layers})"
                  for model_name, _, cells in rows
                  for criterion, structure, _, zero_layers, layers in cells if zero_layers]
    lines += ["", f"Cells where a layer scored all exactly 0 (a degenerate score): {', '.join(degenerate) or 'none'}."]
    lines += [
        "",
        f"## Conductance: ours vs captum's LayerConductance per layer ({args.reference_batches} batch(es) of "
        f"{args.batch_size}, same run)",
        "",
        "Ours is timed just before and just after the one reference call, fastest kept.",
        "",
        "| model | ours s | captum per layer s | speed-up | largest difference / largest score |",
        "|---|---|---|---|---|",
    ]
    for model_name, ours_s, reference_s, difference in reference_rows:
        lines.append(f"| {model_name} | {ours_s:.2f} | {reference_s:.1f} | {reference_s / ours_s:.0f}x | {difference:.1e} |")
    lines += [
        "",
        "## SynFlow: layers scored all-zero",
        "",
        "| model | prunable layers | old: abs() of every tensor | now: BN folded, saturating activations as ReLU |",
        "|---|---|---|---|",
    ]
    for model_name, layers, old_zero, new_zero in synflow_rows:
        lines.append(f"| {model_name} | {layers} | {old_zero} | {new_zero} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reference-batches", type=int, default=1)
    parser.add_argument("--reference-models", default=",".join(REFERENCE_MODELS),
                        help="comma-separated zoo models to check against captum (memory-hungry)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell of the main table")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_criteria.md")))
    args = parser.parse_args()
    rows, reference_rows, synflow_rows, loads = [], [], [], [os.getloadavg()[0]]

    def write() -> None:  # after every stage, so a run cut short still leaves its numbers
        Path(args.out).write_text(render(args, rows, reference_rows, synflow_rows, loads))

    for model_name, entry in ZOO.items():
        dataset = load_dataset(entry.default_dataset)
        model = fresh(model_name, dataset)
        ours = criteria.weight_scores(model, "synflow", input_shape=dataset.input_shape)
        synflow_rows.append((model_name, len(ours), plain_abs_synflow_zero_layers(model, dataset.input_shape),
                             sum(1 for score in ours.values() if not score.any())))

    for model_name, entry in ZOO.items():
        dataset = load_dataset(entry.default_dataset)
        model = fresh(model_name, dataset)
        calib = dataset.calibration(args.batches, args.batch_size, seed=0)
        cells = []
        for criterion in criteria.CRITERIA:
            for structure, score_fn in STRUCTURES.items():
                scores, seconds = timed(score_fn, model, criterion, calib, repeats=args.repeats,
                                        input_shape=dataset.input_shape)
                zero_layers = sum(1 for score in scores.values() if not score.any())
                cells.append((criterion, structure, seconds, zero_layers, len(scores)))
                loads.append(os.getloadavg()[0])
                print(f"{model_name} {criterion} {structure}: {seconds:.2f} s (load {loads[-1]:.1f})", flush=True)
        rows.append((model_name, entry.default_dataset, cells))
        write()

    for model_name in filter(None, args.reference_models.split(",")):
        dataset = load_dataset(ZOO[model_name].default_dataset)
        model = fresh(model_name, dataset)
        calib = dataset.calibration(args.reference_batches, args.batch_size, seed=0)
        ours, ours_before_s = timed(criteria.channel_scores, model, "conductance", calib)
        reference, reference_s = timed(captum_conductance_channels, model, calib)
        _, ours_after_s = timed(criteria.channel_scores, model, "conductance", calib)
        loads.append(os.getloadavg()[0])
        difference = max(float((ours[name] - reference[name]).abs().max() / reference[name].abs().max().clamp_min(1e-30))
                         for name in ours)
        reference_rows.append((model_name, min(ours_before_s, ours_after_s), reference_s, difference))
        print(f"{model_name} conductance: ours {ours_before_s:.1f} / {ours_after_s:.1f} s, "
              f"captum per layer {reference_s:.1f} s", flush=True)
        write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
