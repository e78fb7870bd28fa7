"""Prunable layers, their effective weights, mask folding and devices: the one place that knows them.

Every other module asks here instead of guessing:

* which modules can be pruned (`prunable_layers`: every Conv1d, Conv2d and Linear, whose
  ``weight`` is what criteria score and masks cover, and every ``nn.MultiheadAttention`` with
  one packed input projection, whose ``in_proj_weight`` (query, key and value rows) is its
  weight: `weight_name` says which tensor of a layer that is);
* what weight the forward pass really uses (`effective_weight`: ``weight_orig * weight_mask``
  on a module masked by ``torch.nn.utils.prune``, the plain ``weight`` otherwise);
* how to copy a model that carries masks (`clone_model`), and how to fold its masks into plain
  weights as it would be saved or deployed (`fold_masks`);
* where a model lives and where it should run (`model_device`, `choose_device`, `on_device`).

Example::

    masked = masking.apply(model, plan, ranking)
    effective_weight(dict(prunable_layers(masked))["fc1"])  # zeros where the mask is 0
    deployed = fold_masks(masked)                           # no hooks, same numbers
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune

from explorer.errors import ExplorerError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_MASK_SUFFIX = "_mask"
_ORIG_SUFFIX = "_orig"


def _packed_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None \
        or hasattr(module, "in_proj_weight_orig")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv1d, Conv2d, Linear and packed ``nn.MultiheadAttention`` of ``model``, in ``named_modules`` order.

    An attention layer is named by its module (``encoder.layers.0.self_attn``: the input
    projection); its output projection is a Linear of its own (``...self_attn.out_proj``).
    """
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_TYPES) or _packed_attention(module)]


def weight_name(module: nn.Module) -> str:
    """The attribute holding a layer's prunable weight: ``in_proj_weight`` for attention, else ``weight``."""
    return "in_proj_weight" if _packed_attention(module) else "weight"


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's prunable weight as the module holds it (``in_proj_weight`` or ``weight``)."""
    return getattr(module, weight_name(module))


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """A masked layer's ``weight_mask`` (``in_proj_weight_mask`` for attention), None when unmasked."""
    name = weight_name(module)
    return getattr(module, name + _MASK_SUFFIX, None) if hasattr(module, name + _ORIG_SUFFIX) else None


def original_of(module: nn.Module) -> torch.Tensor | None:
    """A masked layer's ``weight_orig`` (the trained Parameter behind the mask), None when unmasked."""
    return getattr(module, weight_name(module) + _ORIG_SUFFIX, None)


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Replace a masked layer's mask tensor (methods that learn masks assign one each step)."""
    setattr(module, weight_name(module) + _MASK_SUFFIX, mask)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward pass uses: ``weight_orig * weight_mask`` on a masked module.

    Recomputed rather than read from ``module.weight``, which the pruning hook refreshes only
    on the next forward pass.
    """
    name = weight_name(module)
    original, mask = getattr(module, name + _ORIG_SUFFIX, None), getattr(module, name + _MASK_SUFFIX, None)
    if original is not None and mask is not None:
        return original * mask
    return getattr(module, name)


def prunable_counts(model: nn.Module) -> tuple[int, int]:
    """(live, total) weights over the prunable layers: the one definition of sparsity.

    On a module masked by ``torch.nn.utils.prune`` a weight is live when its mask keeps it, whatever
    its value: a connection that SET or RigL grew back starts at zero and is live all the same, so a
    method at a 90 % target reads 90 %, not 90 % plus the fresh zeros. A plain module (never masked,
    or with its masks folded) has no mask to ask, so there a live weight is a non-zero one.
    """
    live = total = 0
    for _, module in prunable_layers(model):
        name = weight_name(module)
        mask = getattr(module, name + _MASK_SUFFIX, None) if hasattr(module, name + _ORIG_SUFFIX) else None
        kept = mask if mask is not None else getattr(module, name).detach()
        live += int(torch.count_nonzero(kept))
        total += kept.numel()
    return live, total


def effective_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the forward pass sees it (masks applied), keyed by name, shared ones once."""
    seen: set[int] = set()
    tensors = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            tensor = param
            if param_name.endswith(_ORIG_SUFFIX):
                base = param_name[: -len(_ORIG_SUFFIX)]
                mask = getattr(module, base + _MASK_SUFFIX, None)
                if mask is not None:
                    tensor, param_name = param * mask, base
            tensors[f"{module_name}.{param_name}" if module_name else param_name] = tensor.detach()
    return tensors


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each module's effective ``weight`` (an attention layer's ``in_proj_weight``), keyed by module name."""
    modules = dict(model.named_modules())
    weights = {}
    for name, tensor in effective_tensors(model).items():
        module_name, _, param_name = name.rpartition(".")
        if param_name == weight_name(modules[module_name]):
            weights[module_name] = tensor
    return weights


class RefreshOutputMask:
    """Forward pre-hook of an ``nn.MultiheadAttention`` whose ``out_proj`` is masked.

    The attention reads ``out_proj.weight`` directly and never calls ``out_proj``, so the
    pruning hook that recomputes ``weight = weight_orig * weight_mask`` would never run: training
    would update ``weight_orig`` behind a stale weight. This hook runs ``out_proj``'s forward
    pre-hooks (the pruning hook, and any a method adds after it) at each attention call.
    Stateless, so deep copies and saved hooks stay right.
    """

    def __call__(self, module: nn.Module, inputs) -> None:
        projection = getattr(module, "out_proj", None)
        for hook in list(getattr(projection, "_forward_pre_hooks", {}).values()):
            hook(projection, inputs)


def sync_attention_masks(model: nn.Module) -> None:
    """Give every attention whose ``out_proj`` carries a mask one `RefreshOutputMask` hook (idempotent)."""
    for module in model.modules():
        if not isinstance(module, nn.MultiheadAttention) or not prune.is_pruned(module.out_proj):
            continue
        if not any(isinstance(h, RefreshOutputMask) for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(RefreshOutputMask())


def is_masked(model: nn.Module) -> bool:
    """True if any module of ``model`` carries a ``torch.nn.utils.prune`` re-parametrisation."""
    return prune.is_pruned(model)


def clone_model(model: nn.Module, *, fold_masks: bool = False) -> nn.Module:
    """Deep copy a model, masked (torch.nn.utils.prune) models included.

    A masked module keeps its effective ``weight`` as a non-leaf tensor that ``copy.deepcopy``
    refuses; we hand deepcopy a detached stand-in (the pruning hook recomputes it on the next
    forward anyway) so the cached original stays untouched. With ``fold_masks`` the copy's
    masks are made permanent (``prune.remove``): each ``weight`` becomes an ordinary Parameter
    holding its zeros, as the model would be saved or deployed.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            names = [h._tensor_name for h in getattr(hook, "_pruning_methods", [hook])
                     if hasattr(h, "_tensor_name")]
            for tensor_name in names:
                current = module.__dict__.get(tensor_name)
                if isinstance(current, torch.Tensor) and not current.is_leaf:
                    memo[id(current)] = current.detach().clone()
    copied = copy.deepcopy(model, memo)
    if fold_masks:
        for module in copied.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(module, hook._tensor_name)
                elif isinstance(hook, RefreshOutputMask):
                    del module._forward_pre_hooks[key]
    return copied


def fold_masks(model: nn.Module) -> nn.Module:
    """A copy with masks folded into plain ``weight`` tensors (``prune.remove``); zeros stay.

    This is the model as deployed: the pruning hook (a multiply before every forward) is
    gone, so timing it measures the cost of the zeros, not of the hook.
    """
    return clone_model(model, fold_masks=True)


def available_devices() -> list[str]:
    """Devices this machine can run on, best first."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def choose_device(preference: str | None = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    available = available_devices()
    if preference in (None, "", "auto"):
        return torch.device(available[0])
    kind = str(preference).split(":")[0]
    if kind not in available:
        raise ExplorerError(f"Device '{preference}' is not available here; available: {', '.join(available)}.")
    return torch.device(preference)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (cpu for a model without parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself if already there, else a moved copy (never move the caller's model)."""
    if model_device(model) == device:
        return model
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExplorerError(f"device {device} is not available here: use cpu")
    return clone_model(model).to(device)
