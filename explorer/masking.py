"""Apply an unstructured Plan as masks: zeros in dense tensors, fine-tunable.

``torch.nn.utils.prune`` re-parametrises ``weight`` as ``weight_orig * weight_mask``, so a
masked copy can be fine-tuned while its pruned weights stay zero. This shrinks the
*compressed file*, not latency: dense kernels multiply zeros just as fast (structured
removal lives in :mod:`explorer.structural`).

Example::

    ranking = prepare(weight_scores(model, "magnitude"))
    pruned = apply(model, plan(ranking, 0.8, scope="global"), ranking)
    sparsity_report(pruned)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, prunable_layers
from explorer.planner import Plan, Ranking


def masks(ranking: Ranking, plan: Plan) -> dict[str, torch.Tensor]:
    """Boolean mask per layer, shaped like its scores (True = kept, False = pruned)."""
    result = {}
    for index, (name, shape) in enumerate(zip(ranking.names, ranking.shapes)):
        total, pruned = int(ranking.sizes[index]), plan.layer(name).pruned
        if plan.layer(name).total != total:
            raise ExplorerError(f"The plan does not fit this ranking (layer {name!r}): re-plan from the same scores.")
        if pruned <= total // 2:  # write whichever side is smaller
            keep = np.ones(total, dtype=bool)
            keep[ranking.units(index, 0, pruned)] = False
        else:
            keep = np.zeros(total, dtype=bool)
            keep[ranking.units(index, pruned)] = True
        result[name] = torch.from_numpy(keep).reshape(shape)
    return result


def apply(model: nn.Module, plan: Plan, ranking: Ranking) -> nn.Module:
    """A masked deep copy of ``model``: each planned layer gets ``weight_orig``/``weight_mask``.

    The plan must be unstructured (one unit per weight). Applying to an already masked
    model multiplies the masks, as iterative pruning expects. ``model`` is not modified.
    """
    return apply_masks(model, masks(ranking, plan))


def apply_masks(model: nn.Module, layer_masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with ``torch.nn.utils.prune.custom_from_mask`` on each named layer."""
    pruned_model = clone_model(model)
    modules = dict(prunable_layers(pruned_model))
    for name, mask in layer_masks.items():
        if name not in modules:
            raise ExplorerError(f"The plan names layer {name!r}, which this model does not have.")
        weight = modules[name].weight
        if mask.shape != weight.shape:
            raise ExplorerError(
                f"Layer {name!r}: the plan has {tuple(mask.shape)} units but the weight is "
                f"{tuple(weight.shape)}; a channel plan is applied with explorer.structural, not masks."
            )
        prune.custom_from_mask(modules[name], "weight", mask.to(weight.device))
    return pruned_model


def nm_masks(scores: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """Semi-structured N:M masks: in every run of ``m`` consecutive weights keep the ``n`` best.

    Runs are taken along each filter's flattened weights (``weight.flatten(1)``, i.e. along
    the input features of a Linear), which is the 2:4 pattern sparse tensor cores accelerate
    for Linear layers. Sparsity is exactly ``1 - n/m`` in every layer; ties keep the lower index.
    Apply the result with :func:`apply_masks`.
    """
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) or not 0 <= n <= m or m < 1:
        raise ExplorerError(f"N:M needs integers 0 <= N <= M and M >= 1, got {n}:{m}.")
    result = {}
    for name, score in scores.items():
        if score.dim() < 2 or score[0].numel() % m:
            raise ExplorerError(
                f"Layer {name!r}: each filter has {score[0].numel() if score.dim() else 1} weights, not a "
                f"multiple of {m}; protect it or pick another M."
            )
        groups = score.detach().reshape(score.shape[0], -1, m)
        best = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
        result[name] = keep.reshape(score.shape)
    return result


def sparsity_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (zeros, total)}`` counted in the effective weights, masked or not."""
    report = {}
    for name, module in prunable_layers(model):
        weight = effective_weight(module).detach()
        report[name] = (int((weight == 0).sum()), weight.numel())
    return report
