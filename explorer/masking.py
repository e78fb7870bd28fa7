"""Apply an unstructured Plan as masks: zeros in dense tensors, fine-tunable.

``torch.nn.utils.prune`` re-parametrises ``weight`` as ``weight_orig * weight_mask``, so a
masked copy can be fine-tuned while its pruned weights stay zero. This shrinks the
*compressed file*, not latency: dense kernels multiply zeros just as fast (structured
removal lives in :mod:`explorer.structural`).

:func:`apply` and :func:`apply_masks` mask a copy. Methods over time (gradual and iterative
pruning, SET / RigL, lottery tickets) update the masks of the model being trained instead:
:func:`current_masks` reads them, :func:`set_masks` writes them in place, choosing what a
pruned weight that grows back starts from, and :func:`kept_units` feeds them to the planner.

Example::

    ranking = prepare(weight_scores(model, "magnitude"))
    pruned = apply(model, plan(ranking, 0.8, scope="global"), ranking)
    sparsity_report(pruned)

    scores = weight_scores(model, "magnitude")            # one round of iterative pruning
    ranking = prepare(scores, kept=kept_units(current_masks(model), scores))
    set_masks(model, masks(ranking, plan(ranking, 0.9, "global")))
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, prunable_layers, sync_attention_masks, weight_name
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
    for name, module in _masked_modules(pruned_model, layer_masks).items():
        prune.custom_from_mask(module, weight_name(module), layer_masks[name].to(effective_weight(module).device))
    sync_attention_masks(pruned_model)
    return pruned_model


def _masked_modules(model: nn.Module, layer_masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The module of each named layer, after checking every mask fits its weight (nothing changed yet)."""
    modules = dict(prunable_layers(model))
    for name, mask in layer_masks.items():
        if name not in modules:
            raise ExplorerError(
                f"The masks name layer {name!r}, which this model does not have; its prunable layers: "
                f"{', '.join(modules) or 'none'}."
            )
        shape = tuple(effective_weight(modules[name]).shape)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ExplorerError(
                f"Layer {name!r}: the mask is {got} but the weight is {shape}; give a mask of shape {shape} "
                "(a channel plan is applied with explorer.structural, not masks)."
            )
    return {name: modules[name] for name in layer_masks}


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks ``model`` carries now: ``{layer: bool tensor shaped like its weight}``, True = kept.

    Only masked layers appear (a layer left out keeps every weight), so
    ``set_masks(model, current_masks(model))`` changes nothing. The tensors are copies:
    editing them does not touch the model. A model whose masks were folded has none; its
    zeros are ordinary weights.
    """
    return {name: _mask_of(module).bool() for name, module in prunable_layers(model) if _has_mask(module)}


def _has_mask(module: nn.Module) -> bool:
    name = weight_name(module)
    return hasattr(module, name + "_orig") and hasattr(module, name + "_mask")


def _mask_of(module: nn.Module) -> torch.Tensor:
    return getattr(module, weight_name(module) + "_mask")


def _original_of(module: nn.Module) -> torch.Tensor:
    return getattr(module, weight_name(module) + "_orig")


def set_masks(
    model: nn.Module, layer_masks: Mapping[str, torch.Tensor], *, regrow: str | Mapping[str, torch.Tensor] = "zero"
) -> dict[str, torch.Tensor]:
    """Set the masks of ``model`` itself (the model being trained); return the regrown units per layer.

    A layer without a mask gets the ``torch.nn.utils.prune`` re-parametrisation, whose
    ``weight_orig`` *is* the old ``weight`` Parameter (an all-True mask leaves such a layer
    unmasked). A masked layer has its ``weight_mask`` buffer overwritten in place: same
    tensor, no new Parameter, so an optimizer holding ``weight_orig`` keeps working. Pruned
    weights are exactly zero in the effective weight afterwards; ``weight_orig`` keeps their
    values. A unit pruned before and kept now *regrows* from a value chosen by ``regrow``:

    * ``"zero"``: 0, as RigL grows connections;
    * ``"keep"``: what ``weight_orig`` still holds (the value when it was pruned, moved by
      any momentum or weight decay since);
    * ``{layer: tensor shaped like the weight}``: its values there, e.g. those at
      initialisation (lottery-ticket rewinding); every layer that regrows needs an entry.

    Optimizer state (momentum, Adam moments) is left alone: reset it for the returned
    units if the method asks, e.g. ``state[weight_orig]["momentum_buffer"][regrown] = 0``.
    Every mask is checked before anything changes; a mismatch raises one ExplorerError.
    """
    if not (isinstance(regrow, Mapping) or (isinstance(regrow, str) and regrow in ("zero", "keep"))):
        raise ExplorerError(f"regrow must be 'zero', 'keep' or {{layer: values}}, got {regrow!r}.")
    modules = _masked_modules(model, layer_masks)
    kept, regrown = {}, {}
    for name, module in modules.items():
        kept[name] = layer_masks[name].to(effective_weight(module).device).bool()
        kept_before = _mask_of(module).bool() if _has_mask(module) else torch.ones_like(kept[name])
        regrown[name] = kept[name] & ~kept_before
        if isinstance(regrow, Mapping) and regrown[name].any():
            _check_values(name, regrow.get(name), tuple(kept[name].shape))
    with torch.no_grad():
        for name, module in modules.items():
            if not _has_mask(module):
                if not kept[name].all():
                    prune.custom_from_mask(module, weight_name(module), kept[name])
                continue
            original = _original_of(module)
            grown = regrown[name]
            if regrow == "zero":
                original[grown] = 0
            elif regrow != "keep" and grown.any():
                original[grown] = regrow[name].to(original)[grown]
            _mask_of(module).copy_(kept[name])
            setattr(module, weight_name(module), effective_weight(module))  # as the pruning hook sets it
    sync_attention_masks(model)
    return regrown


def zero_pruned(model: nn.Module, layer_masks: Mapping[str, torch.Tensor]) -> None:
    """Prune ``model`` IN PLACE without masks: each named layer's pruned weights become plain zeros.

    No ``weight_orig`` / ``weight_mask`` re-parametrisation, so no memory beyond the model: the way
    to prune a model that is measured, saved or deployed but not fine-tuned (a fine-tune would grow
    the zeros back; use `set_masks` for that). Every mask is checked before anything changes; a
    layer must be unmasked and untied (a tied weight would zero its twin too).
    """
    modules = _masked_modules(model, layer_masks)
    for name, module in modules.items():
        if _has_mask(module):
            raise ExplorerError(f"Layer {name!r} carries a mask already; set its masks with set_masks instead.")
    with torch.no_grad():
        for name, module in modules.items():
            weight = getattr(module, weight_name(module))
            weight.masked_fill_(~layer_masks[name].to(weight.device).bool(), 0)


def _check_values(name: str, values, shape: tuple[int, ...]) -> None:
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != shape:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else "missing"
        raise ExplorerError(
            f"Layer {name!r} regrows pruned weights but its regrow values are {got}; give a tensor of shape {shape}."
        )


def kept_units(layer_masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The current mask in the planner's units: the ``kept=`` argument of :func:`explorer.planner.prepare`.

    A mask shaped like a layer's scores passes as it is (weight masks for weight scores,
    channel masks for channel scores). A weight mask against one score per output channel
    becomes a channel mask: a channel is live while any of its weights is kept. Masks of
    layers without scores are dropped; scored layers without a mask are all live.
    """
    result = {}
    for name, mask in layer_masks.items():
        if name not in scores:
            continue
        shape = tuple(scores[name].shape)
        if tuple(mask.shape) == shape:
            result[name] = mask.bool()
        elif len(shape) == 1 and mask.dim() > 1 and mask.shape[0] == shape[0]:
            result[name] = mask.bool().flatten(1).any(1)
        else:
            raise ExplorerError(
                f"Layer {name!r}: a mask of shape {tuple(mask.shape)} does not fit its scores of shape {shape}; "
                f"give a mask of shape {shape}, or the weight mask of that layer."
            )
    return result


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
