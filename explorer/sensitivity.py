"""Sensitivity scans: how much can each layer (or coupled channel group) lose on its own?

For every unit — a prunable layer (unstructured) or a channel group *as a whole* (channel and head
structure: pruning one member of a residual group alone removes nothing) — `scan` prunes only that
unit to each sparsity of a grid, everything else dense, and evaluates the task metric (accuracy,
perplexity or fidelity) on the first ``samples`` examples of a split. A cell is exactly what
`pipeline.preview` with local scope and every other unit protected would prune: the unit's lowest-
ranked weights or channels under the prepared scores. ``order`` lists the units from robust to
fragile by the **area under the drop curve**: the trapezoid area of drop over sparsity, from
(0, 0) through every cell of the unit's row; smaller is more robust, ties keep model order.

Why it is fast (resnet20 / shapes, 12 groups x 10 ratios on 512 images: about 22 s on the 2-core CPU
the project runs on, where applying and evaluating every cell takes about 55 s; bench/RESULTS_sensitivity.md):

* scores are computed and sorted once (`pipeline.prepare`); a cell's plan is a lookup (milliseconds);
* nothing is copied per cell: one working copy (masks folded) is edited in place, evaluated on a subset
  held in memory in batches of 128, and restored;
* **unstructured**: the unit's pruned weights are multiplied by a 0/1 float mask — the very product
  ``weight_orig * weight_mask`` that `pipeline.apply`'s masks compute — so the value is bit-identical;
* **channels** are not removed but *emulated*: removing channel k of a group deletes it from every
  "out" member (filters, BatchNorm entries, a depthwise conv's channel) and input column k of every
  "in" member (consumer). In the dense copy channel k still exists between producers and consumers,
  but all it passes through there is channel-wise (BatchNorm, activations, pooling, a residual add
  with the same channel of another producer of the group, a depthwise conv, whose channel k reads
  only input channel k), so it never leaks into another channel and reaches the rest of the network
  only through the consumers. Zeroing ``weight[:, k]`` of every consumer therefore leaves every other
  channel with the values of the physically pruned model: the outputs agree up to float summation
  order (tested against `pipeline.apply`). Zeroing the producer's filter instead would be wrong: the
  BatchNorm after it still emits its bias, into every later block of a residual stream.
  The argument needs every member to be a Conv/Linear (grouped only when depthwise, which the
  groups mark as a producer) or a BatchNorm; a group with any other member (LayerNorm and GroupNorm
  mix channels), every head-structure unit and every SparseGPT cell (its apply also rebuilds the
  kept weights) are pruned physically, `pipeline.apply` per cell. Physical removal is not slow in itself
  (torch-pruning thins resnet20 in about 30 ms), but it changes every shape after the unit; emulation
  keeps the dense shapes, and that is what lets a cell re-use the dense activations:
* **only what the unit can change is re-run** (accuracy, the zoo's task): the working copy is traced once
  with ``torch.fx``; for a unit, the nodes that read its edited layers and everything downstream are
  re-run per cell, from the values entering them (computed once per unit on the dense model and kept
  per batch). The nodes left out do not read the edited weights, so their values are the edited
  model's too, and the re-run nodes do the same ops on the same inputs: bit-identical to a full
  forward. This is the main saving: a late group re-runs only its last blocks and the classifier, and the
  resnet20 scan takes 22 s instead of about 40 s. A model fx cannot trace, a unit it does not show as a
  module call, or kept activations above ``REPLAY_BYTES`` run the whole forward.

A cell whose plan empties its unit (``collapsed``; e.g. 95 % of a 6-filter conv) cannot be applied —
`prune` refuses it — so it is evaluated with the unit switched off entirely (all its weights, or
all its channels' consumer columns, zero): the limit of the curve. Under physical pruning it has no
value (None), and `order` counts a missing drop as the largest drop of the scan.

Example::

    result = scan(model, dataset, ScoringSpec("channel", "magnitude"), samples=512)
    result.order[0], result.to_dict()["cells"][0]   # the most robust group; {unit, sparsity, value, drop, ...}
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from explorer import criteria, limits, measure, pipeline, planner, tasks
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model, prunable_layers, weight_of
from explorer.specs import STRUCTURES, MeasureSpec, PlanSpec, ScoringSpec

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_SAMPLES = 512
SCANNED = ("unstructured", "channel", "head")  # N:M fixes its sparsity: nothing to scan
_PREPARE_SHARE = 0.1  # of the progress bar, when the scan scores the model itself
EVAL_BATCH = 128  # faster than 256 on a 2-core CPU (the activations stay in cache)
REPLAY_BYTES = 1 << 30  # the most the kept activations of one unit may take; more runs the whole forward
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CHANNELWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Cell:
    """One unit pruned to one sparsity: the metric, its drop from the dense model, what it saves.

    ``pruned`` / ``total`` count the unit's weights or channels; ``params_saved`` and ``flops_saved``
    (per input) come from `pipeline.estimate` (exact for unstructured, an estimate for channels).
    """

    unit: str
    sparsity: float
    value: float | None
    drop: float | None
    pruned: int
    total: int
    params_saved: int
    flops_saved: int
    collapsed: bool = False
    latency_ms: float | None = None
    latency_noisy: bool | None = None  # its 95 % interval stayed wider than +-5 % (a busy machine)


@dataclass
class Scan:
    """A finished (or cancelled) scan: cells unit by unit, and the units from robust to fragile.

    ``drop`` is ``base - value`` for a metric where higher is better, ``value - base`` otherwise
    (perplexity, KL), so a larger drop is always worse. ``physical`` names the units evaluated by
    physical removal instead of emulation. A cancelled scan keeps the cells it finished; its
    ``order`` ranks only the units whose row is complete.
    """

    metric: str
    measure: str
    higher_is_better: bool
    split: str
    samples: int
    base: float
    structure: str
    criterion: str
    sparsities: list[float]
    units: list[str]
    cells: list[Cell] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    physical: list[str] = field(default_factory=list)
    base_latency_ms: float | None = None
    seconds: float = 0.0
    cancelled: bool = False
    params_prunable: int = 0  # weights of the prunable layers: what an overall sparsity is a fraction of
    flops_dense: int = 0  # FLOPs per input of the dense model: what a FLOPs reduction is a fraction of

    def row(self, unit: str) -> list[Cell]:
        """The cells of one unit, in sparsity order."""
        return [cell for cell in self.cells if cell.unit == unit]

    def areas(self) -> dict[str, float]:
        """Area under each complete unit's drop curve: the key of ``order``."""
        return drop_areas(self.cells, self.sparsities)

    def to_dict(self) -> dict:
        """The headless contract ``{metric, split, samples, base, cells: [{unit, sparsity, value, drop}], order}``
        plus context (structure, criterion, measure, seconds, ...); ``json.dumps`` works on it."""
        return {
            "metric": self.metric, "split": self.split, "samples": self.samples, "base": self.base,
            "cells": [dataclasses.asdict(cell) for cell in self.cells], "order": list(self.order),
            "measure": self.measure, "higher_is_better": self.higher_is_better, "structure": self.structure,
            "criterion": self.criterion, "sparsities": list(self.sparsities), "units": list(self.units),
            "physical": list(self.physical), "base_latency_ms": self.base_latency_ms, "seconds": self.seconds,
            "cancelled": self.cancelled, "params_prunable": self.params_prunable, "flops_dense": self.flops_dense,
        }


def drop_areas(cells: Iterable[Cell], sparsities: Sequence[float]) -> dict[str, float]:
    """Trapezoid area of drop over sparsity from (0, 0) through each unit's cells (complete rows only).

    A cell without a value (a collapsed unit that cannot be removed physically) counts as the
    largest drop of the scan: a unit that cannot go that far is at least as fragile as the worst cell.
    """
    cells = list(cells)
    finite = [cell.drop for cell in cells if cell.drop is not None]
    worst = max(finite) if finite else 0.0
    rows: dict[str, dict[float, float]] = {}
    for cell in cells:
        rows.setdefault(cell.unit, {})[cell.sparsity] = worst if cell.drop is None else cell.drop
    areas = {}
    for unit, row in rows.items():
        if len(row) < len(sparsities):
            continue
        area, last_s, last_d = 0.0, 0.0, 0.0
        for s in sorted(row):
            area += (s - last_s) * (row[s] + last_d) / 2
            last_s, last_d = s, row[s]
        areas[unit] = area
    return areas


def robust_order(cells: Iterable[Cell], sparsities: Sequence[float], units: Sequence[str]) -> list[str]:
    """Units from robust to fragile: ascending area under the drop curve, ties in model order."""
    areas = drop_areas(cells, sparsities)
    return sorted((unit for unit in units if unit in areas), key=lambda unit: areas[unit])


def check_sparsities(sparsities) -> list[float]:
    """The grid sorted and without repeats; each sparsity must be in (0, 1]."""
    values = list(sparsities) if isinstance(sparsities, Iterable) and not isinstance(sparsities, str) else None
    if not values:
        raise ExplorerError("Give at least one sparsity to scan, e.g. 0.1,0.5,0.9.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) \
                or not 0.0 < value <= 1.0:
            raise ExplorerError(f"Sparsity {value!r} is outside (0, 1]: a scan prunes each unit to sparsities "
                                "above 0 and at most 1.")
    return sorted({float(value) for value in values})


def check_samples(samples: int | None) -> None:
    """The size of a validation subset: a positive whole number, or None for the whole split."""
    if samples is None:
        return
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise ExplorerError(f"samples must be a whole number of examples or all, got {samples!r}.")
    if samples < 1:
        raise ExplorerError(f"A validation subset of {samples} samples is empty: ask for at least 1 sample (or all).")
    if samples > limits.MAX_SAMPLES:
        raise ExplorerError(f"samples {samples:,} is above the limit of {limits.MAX_SAMPLES:,}; ask for all instead.")


def validation_subset(dataset: Dataset, split: str, samples: int | None) -> tuple[Dataset, int]:
    """The dataset with ``split`` cut to its first ``samples`` examples (None: all) and that count."""
    check_samples(samples)
    x, y = dataset.split(split)
    if len(y) == 0:
        raise ExplorerError(f"The {split} split of '{dataset.name}' is empty: choose another split.")
    if samples is None or samples >= len(y):
        return dataset, len(y)
    return dataclasses.replace(dataset, **{f"x_{split}": x[:samples], f"y_{split}": y[:samples]}), samples


def emulable(group, modules: dict[str, nn.Module]) -> bool:
    """True when zeroing the consumers' input columns equals removing the group's channels (module doc)."""
    consumers = [member for member in group.members if member.cut == "in"]
    if not consumers:
        return False
    for member in group.members:
        module = modules.get(member.layer)
        if member.cut == "in":
            ok = isinstance(module, _CONSUMERS) and getattr(module, "groups", 1) == 1
        else:
            ok = isinstance(module, _CONSUMERS + _CHANNELWISE)
        if not ok:
            return False
    return True


def emulate(model: nn.Module, prepared: pipeline.Prepared, plan: planner.Plan) -> nn.Module:
    """A dense copy of ``model`` that computes what ``pipeline.apply(model, prepared, plan)`` computes.

    Unstructured plans become zeroed weights; channel plans zeroed input columns of each group's
    consumers (the module docstring says why this is exact). Raises for a group that cannot be
    emulated (`emulable`) and for head structure. Unlike `pipeline.apply` it also takes a plan that
    empties a unit: the unit is then switched off entirely.
    """
    copy = clone_model(model, fold_masks=True).eval()
    edits = _Edits(copy, prepared)
    for layer_plan in plan.layers:
        if layer_plan.pruned:
            if not edits.can_emulate(layer_plan.name):
                raise ExplorerError(f"Unit {layer_plan.name!r} cannot be emulated by zeroed weights; "
                                    "use pipeline.apply.")
            edits.zero(layer_plan.name, planner.pruned_indices(prepared.ranking, plan, layer_plan.name))
    return copy


class _Edits:
    """In-place pruning of one unit of a working copy, and its exact undo."""

    def __init__(self, work: nn.Module, prepared: pipeline.Prepared):
        self.work = work
        self.prepared = prepared
        self.modules = dict(work.named_modules())
        self.groups = {group.name: group for group in prepared.groups}
        self.saved: dict[str, torch.Tensor] = {}

    def can_emulate(self, unit: str) -> bool:
        if self.prepared.criterion == "sparsegpt":  # its apply also rebuilds the kept weights: not a mask
            return False
        if self.prepared.structure == "unstructured":
            return True
        if self.prepared.structure != "channel" or unit not in self.groups:
            return False
        return emulable(self.groups[unit], self.modules)

    def targets(self, unit: str) -> list[str]:
        """The layers whose weights pruning ``unit`` edits: the layer itself, or the group's consumers."""
        if self.prepared.structure == "unstructured":
            return [unit]
        return [member.layer for member in self.groups[unit].members if member.cut == "in"]

    @torch.no_grad()
    def zero(self, unit: str, indices: torch.Tensor) -> None:
        """Prune ``indices`` (the unit's flat weight or channel indices) in place, saving what is overwritten."""
        for layer in self.targets(unit):
            weight = weight_of(self.modules[layer])
            self.saved.setdefault(layer, weight.detach().clone())
            if self.prepared.structure == "unstructured":
                keep = torch.ones(weight.numel(), dtype=weight.dtype, device=weight.device)
                keep[indices.to(weight.device)] = 0
                weight.mul_(keep.view_as(weight))  # the product a mask computes: weight_orig * weight_mask
                continue
            chosen = set(indices.tolist())
            member = next(m for m in self.groups[unit].members if m.layer == layer and m.cut == "in")
            columns = [idx for idx, u in zip(member.idxs, member.units) if u in chosen]
            if columns:
                weight.index_fill_(1, torch.tensor(columns, dtype=torch.long, device=weight.device), 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        for layer, original in self.saved.items():
            weight_of(self.modules[layer]).copy_(original)
        self.saved.clear()


class _Replay:
    """Accuracy on a fixed subset, re-running only the part of the forward a unit can change (module doc)."""

    def __init__(self, work: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        self.work, self.num_classes = work, num_classes
        self.batches = [(x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH])
                        for start in range(0, len(y), EVAL_BATCH)]
        self.count = len(y)
        self.steps: list = []
        self.kept: list[dict] = []
        try:
            self.traced = torch.fx.symbolic_trace(work)
        except Exception:  # noqa: BLE001 - fx refuses data-dependent control flow and much else: run it whole
            self.traced = None
        if self.traced is not None:
            placeholders = [node for node in self.traced.graph.nodes if node.op == "placeholder"]
            if len(placeholders) != 1:
                self.traced = None

    def _correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ExplorerError(f"The model outputs {shape}; a classifier for "
                                f"{self.num_classes} classes should output (batch, {self.num_classes}).")
        return int((logits.argmax(1) == y).sum())

    @torch.no_grad()
    def accuracy(self, model: nn.Module | None = None) -> float:
        """Fraction correct: of ``model``'s whole forward, or (None) of the working copy's re-run part."""
        correct = 0
        for index, (x, y) in enumerate(self.batches):
            if model is not None or not self.steps:
                logits = (model if model is not None else self.work)(x)
            else:
                logits = self._rerun(dict(self.kept[index]))
            correct += self._correct(logits, y)
        return correct / self.count

    def focus(self, layers: list[str]) -> None:
        """Keep, per batch, the dense values that enter the nodes ``layers`` can change; re-run only those."""
        self.steps, self.kept = [], []
        if self.traced is None:
            return
        nodes = list(self.traced.graph.nodes)
        starts = {node for node in nodes if (node.op == "call_module" and node.target in layers)
                  or (node.op == "get_attr" and any(node.target.startswith(layer + ".") for layer in layers))}
        seen = {node.target.rsplit(".", 1)[0] if node.op == "get_attr" else node.target for node in starts}
        if not set(layers) <= seen:
            return
        affected: set = set()
        for node in nodes:  # graph order is topological
            if node in starts or any(source in affected for source in node.all_input_nodes):
                affected.add(node)
        output = next(node for node in nodes if node.op == "output")
        if output not in affected:
            return
        frontier = [node for node in nodes if node not in affected and any(user in affected for user in node.users)]
        needed = set(frontier)
        for node in reversed(nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        prefix = [node for node in nodes if node in needed]
        kept, size = [], 0
        with torch.no_grad():
            for x, _ in self.batches:
                values = self._execute(prefix, {}, keep=set(frontier), placeholder=x)
                kept.append({node: values[node] for node in frontier})
                size += sum(value.numel() * value.element_size() for value in kept[-1].values()
                            if isinstance(value, torch.Tensor))
                if size > REPLAY_BYTES:
                    return
        self.steps, self.kept = [node for node in nodes if node in affected], kept

    def _rerun(self, values: dict) -> torch.Tensor:
        return self._execute(self.steps, values, keep={self.steps[-1]})[self.steps[-1]]

    def _execute(self, order: list, values: dict, *, keep: set, placeholder=None) -> dict:
        """Run ``order``'s nodes into ``values``, dropping each value after its last use (unless kept):
        holding every intermediate would make each new activation a fresh allocation, which is slow."""
        last_use = {}
        for node in order:
            for source in node.all_input_nodes:
                last_use[source] = node
        release: dict = {}
        for source, node in last_use.items():
            if source not in keep:
                release.setdefault(node, []).append(source)
        for node in order:
            values[node] = placeholder if node.op == "placeholder" else self._run(node, values)
            for source in release.get(node, ()):
                values.pop(source, None)
        return values

    def _run(self, node, values: dict):
        args = torch.fx.node.map_arg(node.args, lambda source: values[source])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda source: values[source])
        if node.op == "call_module":
            return self.traced.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.traced
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        if node.op == "output":
            return args[0]
        raise ExplorerError(f"Unexpected graph node {node.op!r} while re-running part of the model.")


class _Evaluator:
    """The task metric of a candidate model on the subset; accuracy through `_Replay`, the rest through `tasks`."""

    def __init__(self, model: nn.Module, work: nn.Module, subset: Dataset, split: str):
        self.model, self.work, self.subset, self.split = model, work, subset, split
        self.task = tasks.task_for(model, subset)
        self.replay, self.outputs = None, None
        if self.task == "accuracy":
            x, y = subset.split(split)
            self.replay = _Replay(work, x, y, subset.num_classes)
            self.measure, self.higher_is_better = "accuracy", True
            self.base = self.replay.accuracy(work)
        elif self.task == "fidelity":  # the dense outputs are computed once, not once per cell
            self.outputs = tasks.reference_outputs(model, subset, split)
            self.measure = tasks.default_measure(model)
            self.base, self.higher_is_better = tasks.PERFECT[self.measure], tasks.HIGHER_IS_BETTER[self.measure]
        else:
            result = tasks.evaluate_task(work, subset, task=self.task, split=split)
            self.measure, self.base = result["measure"], result["value"]
            self.higher_is_better = result["higher_is_better"]

    def focus(self, layers: list[str]) -> None:
        """The next values are of the working copy with only ``layers`` edited ([] : forget the kept values)."""
        if self.replay is not None:
            self.replay.focus(layers)

    def value(self, candidate: nn.Module | None = None) -> float:
        """The metric of ``candidate``, or (None) of the working copy as edited now."""
        if self.replay is not None:
            return self.replay.accuracy(candidate)
        return tasks.evaluate_task(candidate if candidate is not None else self.work, self.subset, reference=self.model,
                                   task=self.task, split=self.split, outputs=self.outputs,
                                   measure=self.measure if self.task == "fidelity" else None)["value"]


def _drop(value: float | None, base: float, higher_is_better: bool) -> float | None:
    if value is None:
        return None
    return base - value if higher_is_better else value - base


def scan(model: nn.Module, dataset: Dataset, scoring: ScoringSpec, *,
         sparsities: Sequence[float] = DEFAULT_SPARSITIES, split: str = "val",
         samples: int | None = DEFAULT_SAMPLES, seed: int = 0, latency: bool = False,
         progress: Callable[[float, str], None] | None = None, cancel=None,
         prepared: pipeline.Prepared | None = None, units: Sequence[str] | None = None) -> Scan:
    """Prune each unit alone to each sparsity and evaluate the task metric on a validation subset.

    ``samples`` None takes the whole split. ``latency`` also times each cell's pruned model
    (physically pruned for channels; for unstructured the dense tensors with their zeros, which is
    no faster: the lesson) next to the dense model, batch and repetitions as `MeasureSpec`.
    ``progress(fraction, text)`` follows scoring and cells; ``cancel`` (anything with ``is_set()``)
    stops between cells and returns the cells done, ``cancelled=True``. ``prepared`` reuses scores
    already computed for this model and ``scoring``. ``units`` scans only those units (a share of
    the work for one worker: `explorer.sweep.scan_on` merges the shares). ``model`` is never modified.
    """
    started = time.perf_counter()
    grid = check_sparsities(sparsities)
    subset, count = validation_subset(dataset, split, samples)
    if not prunable_layers(model):
        raise ExplorerError("This model has no prunable layer (Conv1d, Conv2d or Linear): there is nothing to scan.")
    scoring = scoring.validate()
    if scoring.structure not in SCANNED:
        raise ExplorerError(f"The {scoring.structure} structure fixes the sparsity, so there is no grid to scan: "
                            f"use --structure {', '.join(SCANNED)}.")

    def report(fraction: float, text: str) -> None:
        if progress is not None:
            progress(min(1.0, fraction), text)

    share = 0.0
    if prepared is None:
        share = _PREPARE_SHARE
        prepared = pipeline.prepare(model, scoring, dataset=dataset, seed=seed,
                                    progress=lambda f, text: report(share * f, text))
    elif (prepared.structure, prepared.criterion) != (scoring.structure, scoring.criterion):
        raise ExplorerError(f"The prepared scores are {prepared.structure} / {prepared.criterion}, the scan asks for "
                            f"{scoring.structure} / {scoring.criterion}: prepare again with the scan's scoring.")
    work = clone_model(model, fold_masks=True).eval()
    evaluator = _Evaluator(model, work, subset, split)
    scanned = [name for name in prepared.names if units is None or name in set(units)]
    units = list(prepared.names)
    edits = _Edits(work, prepared)
    result = Scan(metric=evaluator.task, measure=evaluator.measure, higher_is_better=evaluator.higher_is_better,
                  split=split, samples=count, base=evaluator.base, structure=prepared.structure,
                  criterion=prepared.criterion, sparsities=grid, units=units,
                  physical=[unit for unit in units if not edits.can_emulate(unit)],
                  params_prunable=sum(prepared.layer_params.values()),
                  flops_dense=prepared.flops_dense)
    example = dataset.example_input(MeasureSpec.batch) if latency else None
    if latency:
        result.base_latency_ms, _ = _latency_ms(work, example)
    total, done = len(scanned) * len(grid), 0
    for unit in scanned:
        others = tuple(name for name in units if name != unit)
        evaluator.focus(edits.targets(unit) if edits.can_emulate(unit) else [])
        for sparsity in grid:
            if cancel is not None and cancel.is_set():
                result.cancelled = True
                break
            plan = pipeline.preview(prepared, PlanSpec(sparsity=sparsity, scope="local", protect=others))
            result.cells.append(_cell(model, prepared, plan, unit, sparsity, edits, evaluator, example))
            done += 1
            report(share + (1 - share) * done / total, f"{unit} at {sparsity:.0%} ({done}/{total})")
        if result.cancelled:
            break
    evaluator.focus([])
    result.order = robust_order(result.cells, grid, units)
    result.seconds = time.perf_counter() - started
    return result


def _cell(model, prepared, plan, unit, sparsity, edits, evaluator, example) -> Cell:
    """Prune ``unit`` as ``plan`` says (in place and undone, or physically), evaluate, time if asked."""
    layer_plan = plan.layer(unit)
    estimate = pipeline.estimate(prepared, plan)
    cell = Cell(unit=unit, sparsity=sparsity, value=evaluator.base, drop=0.0, pruned=layer_plan.pruned,
                total=layer_plan.total,
                params_saved=estimate["params_total"] - estimate["params_after"],
                flops_saved=estimate["flops_dense"] - estimate["flops_after"], collapsed=bool(plan.collapsed))
    timed = example is not None
    if layer_plan.pruned and edits.can_emulate(unit):
        edits.zero(unit, planner.pruned_indices(prepared.ranking, plan, unit))
        try:
            cell.value = evaluator.value()
            if timed and prepared.structure == "unstructured":  # as deployed: the zeros stay in dense tensors
                cell.latency_ms, cell.latency_noisy = _latency_ms(edits.work, example)
        finally:
            edits.restore()
    elif layer_plan.pruned:
        physical = None if plan.collapsed else pipeline.apply(model, prepared, plan)
        cell.value = None if physical is None else evaluator.value(physical)
        if timed and physical is not None:
            cell.latency_ms, cell.latency_noisy = _latency_ms(physical, example)
    if timed and cell.latency_ms is None and not plan.collapsed:
        pruned_model = edits.work if prepared.structure == "unstructured" or not layer_plan.pruned \
            else pipeline.apply(model, prepared, plan)
        cell.latency_ms, cell.latency_noisy = _latency_ms(pruned_model, example)
    cell.drop = _drop(cell.value, evaluator.base, evaluator.higher_is_better)
    return cell


def _latency_ms(model: nn.Module, example: torch.Tensor) -> tuple[float, bool]:
    """Median latency of one cell's model and whether it was noisy (`measure.latency`, the default MeasureSpec)."""
    spec = MeasureSpec()
    timed = measure.latency(model, example, threads=spec.threads, min_run_time=spec.min_run_time)
    return float(timed["median_ms"]), bool(timed["noisy"])


# --- headless: python -m explorer sensitivity ------------------------------------------------------


def _samples(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"samples must be a whole number or 'all', got '{text}'") from None


def add_command(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Register ``sensitivity`` on the CLI's subparsers; ``model_args`` adds --model, --data, --json, ..."""
    parser = sub.add_parser("sensitivity", help="prune each layer / channel group alone over a grid of sparsities")
    model_args(parser)
    add_scan_args(parser)
    parser.add_argument("--latency", action="store_true", help="also time each cell's pruned model (slow)")
    from explorer.sweep import add_backend_args

    add_backend_args(parser, default=None)  # no --backend: this process, as before
    return parser


def add_scan_args(parser: argparse.ArgumentParser) -> None:
    """The scan's flags (structure, criterion, grid, split, samples), shared by ``sensitivity`` and ``suggest``."""
    from explorer.cli import _positive, _sparsities  # cli imports this module: import its helpers late

    parser.add_argument("--structure", choices=[name for name in STRUCTURES if name in SCANNED], default="unstructured")
    parser.add_argument("--criterion", choices=list(criteria.CRITERIA), default="magnitude")
    parser.add_argument("--norm", choices=list(criteria.NORMS), default="l1", help="channel magnitude norm")
    parser.add_argument("--calib-batches", type=_positive, default=4)
    parser.add_argument("--sparsities", type=_sparsities, default=list(DEFAULT_SPARSITIES),
                        help="S1,S2,... in (0, 1] (default 0.1,0.2,...,0.9,0.95)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--samples", type=_samples, default=DEFAULT_SAMPLES,
                        help=f"first N examples of the split, or all (default {DEFAULT_SAMPLES})")


def command(args) -> list[dict]:
    """Run the scan the flags describe; one dict, the headless contract (`Scan.to_dict`)."""
    from explorer.cli import _resolve

    scoring = ScoringSpec(structure=args.structure, criterion=args.criterion, norm=args.norm,
                          calib_batches=args.calib_batches).validate()
    check_sparsities(args.sparsities)
    check_samples(args.samples)  # before the model loads: a bad flag fails at once
    model, dataset, _ = _resolve(args)
    options = dict(sparsities=args.sparsities, split=args.split, samples=args.samples, seed=args.seed,
                   latency=getattr(args, "latency", False))
    if getattr(args, "backend", None) is None:
        result = scan(model, dataset, scoring, **options)
    else:  # units split across workers, merged into the scan one process would give
        from explorer.sweep import scan_on

        result = scan_on(model, dataset, scoring, backend=args.backend, address=args.address, workers=args.workers,
                         **options)
    return [{"model": args.model, "data": dataset.name, **result.to_dict()}]


def format_human(result: dict) -> str:
    """The scan as text: a units x sparsity table of the drop, then the robust -> fragile order."""
    sparsities = result["sparsities"]
    drops = {(cell["unit"], cell["sparsity"]): cell["drop"] for cell in result["cells"]}
    lines = [f"{result['metric']} ({result['measure']}) on the first {result['samples']} of {result['split']}: "
             f"dense {result['base']:.4g}; drop when only that unit is pruned ({result['structure']} "
             f"{result['criterion']})",
             f"{'unit':32s}" + "".join(f"{s:>8.0%}" for s in sparsities)]
    for unit in result["units"]:
        row = [drops.get((unit, s), "") for s in sparsities]
        lines.append(f"{unit:32s}" + "".join(f"{'':>8s}" if d == "" else f"{'-':>8s}" if d is None else f"{d:>8.3f}"
                                             for d in row))
    lines.append("robust -> fragile: " + ", ".join(result["order"]))
    if result.get("cancelled"):
        lines.append("cancelled: the table holds the cells finished")
    return "\n".join(lines)
