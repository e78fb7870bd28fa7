"""Pruning a causal language model in place, a layer or a block at a time: the path a 1 B model fits.

The general path (`explorer.pipeline.prepare` -> `apply` -> `measure_run`) scores every weight, ranks
them all once (an 8-byte sort key per weight), masks a deep copy with ``torch.nn.utils.prune``
(``weight_orig``, a float mask and the masked weight per layer) and measures a folded copy: about
ten times the model's memory, so a 1.1 B model (4.4 GB in fp32) does not fit 24 GB. When the plan is
local to each layer (local scope, or N:M), no ranking across layers is needed: a layer loses
``round(S · n)`` weights, its lowest scores, and those can be found when the layer is pruned. So:

* `refusal` says when this path applies (None) or why not: a causal LM with a stack of transformer
  blocks, unstructured local or N:M (global too for magnitude), magnitude / Wanda / SparseGPT on the
  blocks' Linears, no masks yet.
* `sizes_only` is the ranking such a plan needs: each layer's size, no order; for a global magnitude
  cut, `MagnitudeOrder` finds each layer's share from a threshold, without a sort key per weight.
* `prune` prunes the model IN PLACE: magnitude layer by layer; Wanda and SparseGPT block by block
  (`explorer.blocks.sequential_prune`), one-pass carrying the dense model's hidden states from block
  to block, or sequential carrying the pruned ones. Pruned weights become plain zeros
  (`explorer.masking.zero_pruned`): one block's statistics and one layer's scores are the only
  memory beyond the model.

The masks are the general path's, weight for weight (``tests/test_llm_lean.py``).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from explorer import blocks, llm, masking, planner
from explorer.layers import weight_of
from explorer.specs import PlanSpec, ScoringSpec

LEAN_CRITERIA = ("magnitude", "wanda", "sparsegpt")


def refusal(model: nn.Module, scoring: ScoringSpec, plan: PlanSpec | None = None) -> str | None:
    """Why the lean path cannot prune ``model`` as ``scoring`` and ``plan`` ask, or None when it can."""
    if not blocks.is_causal_lm(model) or blocks.find_blocks(model) is None:
        return "not a causal language model with a stack of transformer blocks"
    if scoring.structure not in ("unstructured", "nm"):
        return f"{scoring.structure} structure removes channels; the lean path masks weights"
    if scoring.criterion not in LEAN_CRITERIA:
        return f"criterion '{scoring.criterion}' is not one of {', '.join(LEAN_CRITERIA)}"
    if scoring.include_head:
        return "the head is pruned too (include_head); the lean path prunes the blocks' Linears"
    if plan is not None and scoring.structure == "unstructured" and plan.scope == "global":
        if scoring.criterion != "magnitude":
            return f"global scope ranks every weight across layers, and {scoring.criterion}'s scores need calibration"
        if plan.min_keep:
            return "min_keep with global scope needs every weight ranked"
    if masking.current_masks(model):
        return "the model carries masks already"
    return None


def sizes_only(names: list[str], shapes: list[tuple[int, ...]], order: MagnitudeOrder | None = None) -> planner.Ranking:
    """A `planner.Ranking` that knows each layer's size and nothing of its order: local and N:M plans, and
    global ones when ``order`` answers them (`MagnitudeOrder`)."""
    sizes = np.array([int(np.prod(shape)) for shape in shapes], dtype=np.int64)
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return planner.Ranking(names=tuple(names), shapes=tuple(tuple(s) for s in shapes), sizes=sizes, offsets=offsets,
                           layer_keys=np.empty(0, dtype=np.uint64), grid_counts=np.zeros((len(names), 0), np.int64),
                           already_pruned=np.zeros(len(names), dtype=np.int64), order=order)


class MagnitudeOrder:
    """The planner's global order of magnitude scores, answered from the weights without a sort key per weight.

    The global cut of ``k`` units is a threshold: find the ``k``-th smallest ``|w|`` over the pool with two
    histogram passes over the float32 bit patterns (which sort like the non-negative floats they encode:
    high 16 bits, then low 16 bits inside the bucket), then count per layer the units below it and hand
    the ties at it out in layer order, as the planner breaks ties (score, layer order, flat index). Memory:
    one layer's temporaries. `planner.plan` calls `counts` and `collapse` on a lean ranking.
    """

    GRID = tuple(round(i / 100, 2) for i in range(101))  # the Prune page's slider steps: answered in one go

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self._answers: dict[tuple[tuple[str, ...], int], dict[str, int]] = {}
        self._collapse: dict[tuple[str, ...], tuple[float, str]] = {}

    def _bits(self, name: str) -> torch.Tensor:
        return weight_of(self.modules[name]).detach().abs().float().contiguous().view(torch.int32).reshape(-1)

    def counts(self, names: list[str], target: int) -> dict[str, int]:
        """``{layer: how many of the pool's ``target`` lowest units it holds}``.

        The first question about a pool is answered alone (`_counts_one`: a CLI plan asks one). The next one
        answers the cuts at every step of `GRID` too (the same three passes over the weights), so a page that
        plans 101 slider steps reads the weights six times, not 303. Both give the same counts.
        """
        if target <= 0:
            return {name: 0 for name in names}
        pool = tuple(names)
        if not any(asked == pool for asked, _ in self._answers):
            self._answers[(pool, target)] = self._counts_one(pool, target)
        elif (pool, target) not in self._answers:
            total = sum(weight_of(self.modules[name]).numel() for name in pool)
            targets = sorted({target, *(round(step * total) for step in self.GRID)} - {0})
            answers = self._counts(pool, targets)
            self._answers.update({(pool, wanted): answer for wanted, answer in zip(targets, answers)})
        return dict(self._answers[(pool, target)])

    def _counts_one(self, names: tuple[str, ...], target: int) -> dict[str, int]:
        """`counts` for one target: a histogram pass for the high 16 bits, one for the low 16 bits inside the
        target's bucket, one that counts each layer's units below and at the threshold (at 124 M, ~20x
        faster than `_counts` with `GRID`'s 101 targets)."""
        high = torch.zeros(1 << 15, dtype=torch.int64)
        for name in names:
            high += torch.bincount((self._bits(name) >> 16).long(), minlength=1 << 15)
        bucket = int(torch.searchsorted(high.cumsum(0), target))
        below = int(high[:bucket].sum())
        low = torch.zeros(1 << 16, dtype=torch.int64)
        for name in names:
            bits = self._bits(name)
            low += torch.bincount((bits[(bits >> 16) == bucket] & 0xFFFF).long(), minlength=1 << 16)
        threshold = (bucket << 16) | int(torch.searchsorted(low.cumsum(0), target - below))
        result, ties = {}, {}
        for name in names:
            bits = self._bits(name)
            result[name], ties[name] = int((bits < threshold).sum()), int((bits == threshold).sum())
        remaining = target - sum(result.values())
        for name in names:  # ties at the threshold go to the earlier layers first
            take = min(ties[name], remaining)
            result[name] += take
            remaining -= take
        return result

    def _counts(self, names: tuple[str, ...], targets: list[int]) -> list[dict[str, int]]:
        """`counts` for several ascending targets: one histogram pass for the high 16 bits, one for the low
        16 bits inside the buckets the targets fall in, one that counts each layer's units below and at every
        threshold (`torch.bucketize`); memory: one layer's temporaries and ``len(targets)`` 64 K histograms."""
        high = torch.zeros(1 << 15, dtype=torch.int64)
        for name in names:
            high += torch.bincount((self._bits(name) >> 16).long(), minlength=1 << 15)
        cumulative = high.cumsum(0)
        wanted = torch.tensor(targets, dtype=torch.int64)
        buckets = torch.searchsorted(cumulative, wanted)  # the bucket holding each target's threshold
        chosen = torch.unique(buckets)
        low = torch.zeros(len(chosen) << 16, dtype=torch.int64)
        for name in names:
            bits = self._bits(name)
            top = (bits >> 16).long()
            inside = torch.isin(top, chosen)
            slot = torch.searchsorted(chosen, top[inside])
            low += torch.bincount((slot << 16) | (bits[inside] & 0xFFFF).long(), minlength=len(chosen) << 16)
        below = cumulative[buckets] - high[buckets]
        slots = torch.searchsorted(chosen, buckets)
        thresholds = [(int(bucket) << 16) | int(torch.searchsorted(low[int(slot) << 16:(int(slot) + 1) << 16].cumsum(0),
                                                                  int(goal - before)))
                      for bucket, slot, goal, before in zip(buckets, slots, wanted, below)]
        edges = torch.tensor(sorted(set(thresholds)), dtype=torch.int32)
        where = {threshold: index for index, threshold in enumerate(edges.tolist())}
        less, ties = {}, {}
        for name in names:
            bits = self._bits(name)
            at_most = torch.bincount(torch.bucketize(bits, edges, right=False), minlength=len(edges) + 1).cumsum(0)
            below_edge = torch.bincount(torch.bucketize(bits, edges, right=True), minlength=len(edges) + 1).cumsum(0)
            less[name], ties[name] = below_edge[:-1].tolist(), (at_most[:-1] - below_edge[:-1]).tolist()
        answers = []
        for target, threshold in zip(targets, thresholds):
            column = where[threshold]
            result = {name: less[name][column] for name in names}
            remaining = target - sum(result.values())
            for name in names:  # ties at the threshold go to the earlier layers first
                take = min(ties[name][column], remaining)
                result[name] += take
                remaining -= take
            answers.append(result)
        return answers

    def collapse(self, names: list[str]) -> tuple[float, str]:
        """The smallest pruned fraction of the pool at which a layer empties, and that layer (see the planner);
        answered once per pool."""
        if tuple(names) not in self._collapse:
            self._collapse[tuple(names)] = self._collapse_of(names)
        return self._collapse[tuple(names)]

    def _collapse_of(self, names: list[str]) -> tuple[float, str]:
        best = {name: float(weight_of(self.modules[name]).detach().abs().float().max()) for name in names}
        first = min(names, key=lambda name: (best[name], names.index(name)))
        ceiling, rank = best[first], 0
        for position, name in enumerate(names):
            scores = weight_of(self.modules[name]).detach().abs().float()
            rank += int((scores < ceiling).sum())
            if position < names.index(first):
                rank += int((scores == ceiling).sum())
            elif name == first:  # its best unit is its last tie in flat order: the ties before it rank lower
                rank += int((scores == ceiling).sum()) - 1
        total = sum(weight_of(self.modules[name]).numel() for name in names)
        return (rank + 1) / total, first


def magnitude_mask(module: nn.Module, count: int, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of one layer under magnitude: its ``count`` smallest ``|w|`` pruned (ties: lower index first),
    or the N:M pattern; what the planner cuts from `explorer.criteria`'s magnitude scores."""
    score = weight_of(module).detach().abs().float()
    if nm is not None:
        return llm.nm_mask(score, *nm)
    return ~llm.row_lowest(score.reshape(1, -1), count).reshape(score.shape)


def prune(model: nn.Module, criterion: str, counts: dict[str, int], calib: list, *, nm: tuple[int, int] | None = None,
          sequential: bool = False, progress: Callable[[float, str], None] | None = None) -> None:
    """Prune ``model`` IN PLACE: ``counts`` is ``{layer: weights to prune}`` (a plan's counts; each layer loses
    its lowest scores, which is the global cut too: a global plan is a threshold).

    Magnitude needs no data; Wanda and SparseGPT calibrate on ``calib`` block by block.
    """
    counts = {name: count for name, count in counts.items() if count}
    if criterion != "magnitude":
        blocks.sequential_prune(model, calib, criterion, counts, nm=nm, progress=progress, one_pass=not sequential,
                                masks=False)
        return
    modules = llm.llm_layers(model, counts)
    for index, (name, module) in enumerate(modules.items()):
        masking.zero_pruned(model, {name: magnitude_mask(module, counts[name], nm)})
        if progress is not None:
            progress((index + 1) / len(modules), f"magnitude: layer {index + 1} of {len(modules)}")
