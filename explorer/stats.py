"""Per-layer summaries and histograms of weights, gradients and attributions.

What the Inspect page and ``python -m explorer inspect`` show: for every prunable layer
(Conv1d, Conv2d, Linear) the distribution of its weights, of the loss gradient over a few
calibration batches, and, for one chosen layer, captum conductance per output channel.
Looking first is how one guesses which layers a global threshold will hit hardest.
"""
from __future__ import annotations

import torch
from torch import nn

from explorer import criteria, measure, tasks
from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, prunable_layers, weight_name


def robust_range(values: torch.Tensor) -> tuple[float, float]:
    """The histogram range of ``values``: min to max, unless a few values lie far outside the bulk.

    The bulk is the 0.1 % to 99.9 % quantiles; when min to max is more than twice as wide as the bulk
    widened by a quarter on each side, the range stops there, so one outlier weight (MiniLM's
    ``output.dense`` has one at 6 among values within ±0.3) no longer squashes the histogram into one
    bar. A mere long tail keeps min to max. The values cut off are counted by `summarize`.
    """
    flat = values.detach().reshape(-1).to(torch.float64).cpu()
    low, high = float(flat.min()), float(flat.max())
    if flat.numel() < 1000:
        return low, high
    bulk_low = float(flat.kthvalue(max(1, int(0.001 * flat.numel()))).values)
    bulk_high = float(flat.kthvalue(min(flat.numel(), int(0.999 * flat.numel()) + 1)).values)
    margin = 0.25 * (bulk_high - bulk_low)
    robust = max(low, bulk_low - margin), min(high, bulk_high + margin)
    return robust if high - low > 2 * (robust[1] - robust[0]) else (low, high)


def summarize(values: torch.Tensor, *, bins: int = 40, value_range: tuple[float, float] | None = None) -> dict:
    """count, mean, std, min, max, mean |v|, fraction of exact zeros and a histogram.

    The histogram spans ``value_range`` (default `robust_range`); ``clipped`` counts the values outside it
    (``below`` / ``above``), which the histogram leaves out and a chart says it left out.
    """
    flat = values.detach().reshape(-1).to(torch.float64).cpu()
    if flat.numel() == 0:
        raise ExplorerError("Cannot summarise an empty tensor.")
    if not torch.isfinite(flat).all():
        raise ExplorerError("The tensor holds NaN or infinite values; the model's weights may be corrupt.")
    low, high = value_range if value_range is not None else robust_range(flat)
    below, above = int((flat < low).sum()), int((flat > high).sum())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(flat, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {
        "count": flat.numel(),
        "mean": float(flat.mean()),
        "std": float(flat.std()) if flat.numel() > 1 else 0.0,
        "min": float(flat.min()),
        "max": float(flat.max()),
        "mean_abs": float(flat.abs().mean()),
        "zeros_fraction": float((flat == 0).double().mean()),
        "hist": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
        "clipped": {"below": below, "above": above},
    }


def _summaries(tensors: dict[str, torch.Tensor], kinds: dict[str, str], bins: int, shared_range: bool) -> dict:
    value_range = None
    if shared_range and tensors:
        ranges = [robust_range(t) for t in tensors.values()]
        value_range = (min(low for low, _ in ranges), max(high for _, high in ranges))
    return {name: {"kind": kinds[name], "shape": list(t.shape), **summarize(t, bins=bins, value_range=value_range)}
            for name, t in tensors.items()}


def weight_stats(model: nn.Module, *, bins: int = 40, shared_range: bool = False) -> dict[str, dict]:
    """Summary and histogram of each prunable layer's (effective, i.e. masked) weight."""
    layers = prunable_layers(model)
    if not layers:
        raise ExplorerError("The model has no Conv1d, Conv2d or Linear layer to inspect.")
    tensors = {name: effective_weight(m).detach() for name, m in layers}
    kinds = {name: type(m).__name__ for name, m in layers}
    return _summaries(tensors, kinds, bins, shared_range)


def gradient_stats(model: nn.Module, calib, *, bins: int = 40, shared_range: bool = False) -> dict[str, dict]:
    """Summary of each prunable layer's loss gradient, averaged over the calibration batches (`mean_gradients`)."""
    return summaries(mean_gradients(model, calib), bins=bins, shared_range=shared_range)


def summaries(tensors: dict[str, tuple[str, torch.Tensor]], *, bins: int = 40, shared_range: bool = False) -> dict:
    """Histogram and summary of each ``name -> (kind, tensor)``: a new bin count or axis needs no new pass."""
    return _summaries({n: t for n, (_, t) in tensors.items()}, {n: k for n, (k, _) in tensors.items()}, bins,
                      shared_range)


def mean_gradients(model: nn.Module, calib) -> dict[str, tuple[str, torch.Tensor]]:
    """Each prunable layer's loss gradient, averaged over the calibration batches: ``name -> (kind, gradient)``.

    The loss is the task's calibration loss (`explorer.tasks.calibration_loss`: cross-entropy on
    labels, next-token loss for a causal LM, the sampled-label Fisher loss without labels, seed 0).
    Runs on a copy in eval mode (BatchNorm statistics stay put); the model is not modified.
    """
    batches = list(calib or [])
    if not batches:
        raise ExplorerError("Gradient statistics need at least one calibration batch of data.")
    work = clone_model(model).eval()
    layers = dict(prunable_layers(work))
    if not layers:
        raise ExplorerError("The model has no Conv1d, Conv2d or Linear layer to inspect.")
    weights = {name: getattr(m, weight_name(m) + "_orig", None) if hasattr(m, weight_name(m) + "_orig")
               else getattr(m, weight_name(m)) for name, m in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {name: torch.zeros_like(w) for name, w in weights.items()}
    device = next(work.parameters()).device
    generator = torch.Generator().manual_seed(0)
    for x, y in batches:
        work.zero_grad(set_to_none=True)
        loss = tasks.calibration_loss(work, x.to(device), y.to(device), generator)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
        for (name, _), grad in zip(weights.items(), grads):
            if grad is not None:
                sums[name] += grad.detach()
    return {name: (type(layers[name]).__name__, s / len(batches)) for name, s in sums.items()}


def attribution(model: nn.Module, layer_name: str, calib) -> torch.Tensor:
    """Mean |conductance| (captum) of each output channel / neuron of one layer."""
    layers = attribution_layers(model)
    if layer_name not in layers:
        raise ExplorerError(f"'{layer_name}' has no output of its own to attribute; choose one of {', '.join(layers)}.")
    return criteria.channel_scores(model, "conductance", calib)[layer_name]


def attribution_layers(model: nn.Module) -> list[str]:
    """The prunable layers conductance scores: all but attention input projections (no output of their own)."""
    return [name for name, module in prunable_layers(model) if weight_name(module) == "weight"]


def layer_table(model: nn.Module, example_input: torch.Tensor) -> list[dict]:
    """One row per module with parameters of its own: name, kind, weight shape, params, FLOPs."""
    per_layer = measure.flops(model, example_input)["per_layer"]
    prunable = {name for name, _ in prunable_layers(model)}
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        weight = getattr(module, "weight", None)
        rows.append({
            "name": name,
            "kind": type(module).__name__,
            "shape": "x".join(str(d) for d in weight.shape) if isinstance(weight, torch.Tensor) else "",
            "params": sum(p.numel() for p in own),
            "flops": int(per_layer.get(name, {}).get("dense", 0)),
            "prunable": name in prunable,
        })
    return rows
