"""A compatibility report before any cut: what each structure can prune in this model, and what it cannot.

Users bring models the explorer has never seen (torchvision's set, their own transformers). Before
any scoring or training, `report` answers per structure:

* **unstructured** and **N:M**: which layers carry a prunable weight (Conv, Linear, the packed
  input projection of ``nn.MultiheadAttention``), and which cannot hold an N:M pattern (inputs per
  output not a multiple of M);
* **channel**: the coupled groups torch-pruning traced, and the groups left out with the reason
  (the model's outputs, a grouped conv, an attention's width), or why the trace itself failed
  (shufflenet's ``ZeroDivisionError`` inside torch-pruning) or did not finish within
  `explorer.deadline.trace_limit` (swin_t, maxvit_t: over 10 minutes unbounded);
* **head**: every attention with its head count and the step it imposes ("4 heads: 1/4 steps",
  one head is 25 % of that attention), including grouped-query attention (`explorer.gqa`);
* the **estimated cost of scoring** per criterion: forward passes it needs, priced by one timed
  forward of a calibration batch.

`refusal` is the cheap part (no trace, no data) that `pipeline.prepare` runs first, then (for channel
and head) the bounded trace, so a structure the model cannot serve is refused in one line before any
calibration or scoring starts.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from explorer import criteria, gqa, heads, mha, structural
from explorer.errors import ExplorerError
from explorer.layers import prunable_layers, weight_of

_GQA_CHANNEL = ("Channel pruning is not offered for LLaMA-style attention: torch-pruning's trace of it did not finish "
                "in 5 minutes here, and it is where structural tools break (Torch-Pruning #516, #461, #532); use "
                "--structure head (whole key/value groups) or unstructured / nm.")

# Forward-pass equivalents per calibration batch (a backward costs about two forwards).
_PASSES = {"magnitude": 0, "random": 0, "bn_scale": 0, "gradient": 3, "taylor": 3, "snip": 3,
           "conductance": 3 * (criteria.CONDUCTANCE_STEPS + 1), "wanda": 1, "sparsegpt": 1}


@dataclass
class StructureReport:
    """What one structure can do with the model: ``ok``, its units, what is left out and why."""

    structure: str
    ok: bool
    units: list[dict] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
    reason: str = ""


def _nm_width(module: nn.Module) -> int:
    weight = weight_of(module)
    return int(weight[0].numel()) if weight.dim() > 1 else 1


def refusal(model: nn.Module, structure: str, nm: tuple[int, int] | None = None) -> str | None:
    """One line saying why ``model`` cannot be pruned with ``structure``, or None. No trace, no data."""
    layers = prunable_layers(model)
    if not layers:
        return ("This model has no Conv1d, Conv2d, Linear or nn.MultiheadAttention layer to prune; "
                "run `python -m explorer inspect --compat` to see what it holds.")
    if structure == "nm":
        m = (nm or (2, 4))[1]
        if not any(_nm_width(module) % m == 0 for _, module in layers):
            return f"No layer of this model has inputs per output in multiples of {m}, so no N:M pattern fits; use unstructured."
    if structure == "channel" and gqa.attentions(model):
        return _GQA_CHANNEL
    if structure == "head":
        try:
            heads.check_supported(model)  # GPT-2's fused projection says so in its own words
        except ExplorerError as error:
            return str(error)
        found = mha.packed_attentions(model) or gqa.attentions(model) or heads.head_counts(model)
        if not found:
            return ("This model has no attention heads (no nn.MultiheadAttention, no Hugging Face attention); "
                    "use --structure channel or unstructured.")
    return None


def _head_units(model: nn.Module) -> tuple[list[dict], list[dict]]:
    units, left_out = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            reason = mha.unsupported(module)
            if reason:
                left_out.append({"name": name, "reason": reason})
            else:
                units.append(_head_row(name, "nn.MultiheadAttention", int(module.num_heads), int(module.head_dim)))
    for name, count in heads.head_counts(model).items():
        module = model.get_submodule(name)
        units.append(_head_row(name, "BERT-style attention", count, int(module.attention_head_size)))
    for name, info in gqa.attentions(model).items():
        row = _head_row(name, "grouped-query attention", info.kv_heads, info.head_dim)
        row["query_heads"] = info.heads
        row["constraint"] = (f"{info.heads} query heads share {info.kv_heads} key/value heads: one unit is a key/value "
                             f"head with its {info.heads // info.kv_heads} query heads, 1/{info.kv_heads} steps")
        units.append(row)
    if isinstance(getattr(model, "hf", None), nn.Module):
        try:
            heads.check_supported(model)
        except ExplorerError as error:
            left_out.append({"name": "(model)", "reason": str(error)})
    return units, left_out


def _head_row(name: str, kind: str, count: int, head_dim: int) -> dict:
    return {"name": name, "kind": kind, "heads": count, "head_dim": head_dim,
            "constraint": f"{count} heads of {head_dim}: 1/{count} steps ({1 / count:.0%} of the attention a head)"}


def _timed_forward(model: nn.Module, example: torch.Tensor) -> float:
    with torch.no_grad():
        model(example)  # warm-up
        started = time.perf_counter()
        model(example)
    return time.perf_counter() - started


def report(model: nn.Module, example_input: torch.Tensor, *, nm: tuple[int, int] = (2, 4),
           calib_batches: int = 4, calib_batch_size: int = 64) -> dict:
    """The compatibility report of ``model`` (plain data): per structure, constraints, scoring cost.

    ``example_input`` is one batch the model accepts (the trace and the timing use it); the scoring
    cost is priced for ``calib_batches`` batches of ``calib_batch_size``, from one timed forward.
    """
    model = model.eval()
    layers = prunable_layers(model)
    kinds = {name: ("MultiheadAttention in_proj" if weight_of(module) is not getattr(module, "weight", None)
                    else type(module).__name__) for name, module in layers}
    structures = {"unstructured": StructureReport("unstructured", bool(layers),
                                                  [{"name": n, "kind": kinds[n]} for n, _ in layers])}
    if not layers:
        structures["unstructured"].reason = refusal(model, "unstructured") or ""
    m = nm[1]
    fits = [{"name": n, "kind": kinds[n]} for n, module in layers if _nm_width(module) % m == 0]
    misfits = [{"name": n, "reason": f"{_nm_width(module)} inputs per output, not a multiple of {m}"}
               for n, module in layers if _nm_width(module) % m]
    structures["nm"] = StructureReport("nm", bool(fits), fits, misfits, refusal(model, "nm", nm) or "")
    try:
        if gqa.attentions(model):
            raise ExplorerError(_GQA_CHANNEL)
        groups, skipped = structural.channel_groups_and_skipped(model, example_input)
        structures["channel"] = StructureReport(
            "channel", bool(groups), [{"name": g.name, "kind": g.kind, "channels": g.channels,
                                      "layers": len(g.members)} for g in groups],
            [{"name": s["root"], "layers": len(s["layers"]), "reason": s["reason"]} for s in skipped],
            "" if groups else "no group of channels can be removed (only the model's outputs)")
    except ExplorerError as error:
        structures["channel"] = StructureReport("channel", False, reason=str(error).splitlines()[0])
    head_units, head_left = _head_units(model)
    structures["head"] = StructureReport("head", bool(head_units), head_units, head_left,
                                         refusal(model, "head") or "")
    if not structures["channel"].ok and structures["channel"].reason.startswith("torch-pruning could not") \
            and not gqa.attentions(model) and not mha.packed_attentions(model):
        structures["head"].ok, structures["head"].reason = False, structures["channel"].reason
    batch = example_input[:1].repeat(calib_batch_size, *([1] * (example_input.dim() - 1)))
    per_batch_s = _timed_forward(model, batch)
    cost = {name: {"forward_passes": passes * calib_batches, "seconds": passes * calib_batches * per_batch_s}
            for name, passes in _PASSES.items()}
    cost["synflow"] = {"forward_passes": 3, "seconds": 3 * per_batch_s / calib_batch_size}
    hessian_inputs = [weight_of(module).reshape(weight_of(module).shape[0], -1).shape[1] for _, module in layers]
    cost["sparsegpt"]["hessian_bytes"] = int(sum(4 * width * width for width in hessian_inputs))
    return {
        "layers": len(layers),
        "params": int(sum(p.numel() for p in model.parameters())),
        "structures": {name: asdict(value) for name, value in structures.items()},
        "constraints": [f"{u['name']}: {u['constraint']}" for u in head_units],
        "scoring": {"calib_batches": calib_batches, "calib_batch_size": calib_batch_size,
                    "forward_seconds": per_batch_s, "criteria": cost},
    }


def summary_lines(result: dict) -> list[str]:
    """The report as short lines (CLI text output, page captions)."""
    lines = []
    for name, entry in result["structures"].items():
        if entry["ok"]:
            lines.append(f"{name}: ok, {len(entry['units'])} units"
                         + (f"; left out {len(entry['left_out'])}" if entry["left_out"] else ""))
        else:
            lines.append(f"{name}: refused: {entry['reason']}")
        for left in entry["left_out"]:
            lines.append(f"  left out {left['name']}: {left['reason']}")
    lines += [f"heads: {line}" for line in result["constraints"]]
    scoring = result["scoring"]
    lines.append(f"scoring cost ({scoring['calib_batches']} batches of {scoring['calib_batch_size']}, one batch's "
                 f"forward {scoring['forward_seconds'] * 1000:.1f} ms here, now): " + ", ".join(
                     f"{name} ~{cost['seconds']:.1f} s" for name, cost in scoring["criteria"].items()))
    return lines
