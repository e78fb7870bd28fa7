"""Grouped-query attention (LLaMA, Mistral, Qwen2): whole key/value groups as the unit of head pruning.

With ``num_key_value_heads`` < ``num_attention_heads`` each key/value head serves
``groups = heads / kv_heads`` consecutive query heads (``repeat_kv``: query head ``h`` reads
key/value head ``h // groups``). Removing a query head alone would change that ratio, and
removing a key/value head leaves its query heads with nothing to attend to; so the unit here is
**one key/value head with its query heads**: ``head_dim`` rows of ``k_proj`` and ``v_proj``,
``groups x head_dim`` rows of ``q_proj`` and the same columns of ``o_proj``. This is where
structural tools often break (Torch-Pruning #516, #461, #532).

`attentions` finds the modules (``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linears and a
``head_dim``), `kv_groups` describes them as channel groups whose costs are counted from those
tensors, and `remove_groups` cuts groups out and updates the Hugging Face config
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` made explicit), so
``save_pretrained`` writes a folder that transformers reloads. The config holds one head count
for every layer, so every layer must lose the same number of groups.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.structural import ChannelGroup, GroupMember

KIND = "key/value groups"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class GQAInfo:
    """One grouped-query attention: query heads, key/value heads and head size."""

    module: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def attentions(model: nn.Module) -> dict[str, GQAInfo]:
    """Every attention with separate q/k/v/o Linear projections and a ``head_dim`` (LLaMA-style; key/value heads <= heads)."""
    found = {}
    for name, module in model.named_modules():
        if not all(isinstance(getattr(module, p, None), nn.Linear) for p in _PROJECTIONS):
            continue
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            continue
        heads, kv_heads = module.q_proj.out_features // head_dim, module.k_proj.out_features // head_dim
        if kv_heads and heads % kv_heads == 0 and kv_heads <= heads:
            found[name] = GQAInfo(name, heads, kv_heads, head_dim)
    return found


def kv_groups(model: nn.Module) -> list[ChannelGroup]:
    """One group per attention; a unit (channel) is one key/value head with its query heads.

    Members: ``q_proj`` (``groups x head_dim`` rows a unit), ``k_proj`` and ``v_proj`` (``head_dim``
    rows) and ``o_proj`` (``groups x head_dim`` input columns). `ChannelGroup.params_removed` of a
    set of units is exactly what `remove_groups` frees.
    """
    result = []
    for name, info in attentions(model).items():
        module = model.get_submodule(name)
        query_rows, kv_rows = info.groups * info.head_dim, info.head_dim
        members = []
        for projection, cut, rows in (("q_proj", "out", query_rows), ("k_proj", "out", kv_rows),
                                      ("v_proj", "out", kv_rows), ("o_proj", "in", query_rows)):
            linear = getattr(module, projection)
            per_row = linear.in_features + (1 if linear.bias is not None else 0) if cut == "out" else linear.out_features
            channels = info.kv_heads * rows
            members.append(GroupMember(layer=f"{name}.{projection}", type="Linear", cut=cut, channels=channels,
                                       idxs=list(range(channels)), units=[i // rows for i in range(channels)],
                                       params_per_channel=per_row))
        group = ChannelGroup(name=name, kind=KIND, channels=info.kv_heads, members=members,
                             params_per_channel_real=0, params_per_channel_naive=members[1].params_per_channel * kv_rows,
                             root_channels=list(range(info.kv_heads)))
        group.params_per_channel_real = group.params_removed(range(info.kv_heads)) // info.kv_heads
        result.append(group)
    return result


def group_scores(groups: list[ChannelGroup], channel_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One score per key/value group: the mean over its projections of each one's mean row score (scale-free)."""
    result = {}
    for group in groups:
        total = torch.zeros(group.channels)
        scored = 0
        for member in group.members:
            if member.cut != "out" or member.layer not in channel_scores:
                continue
            scores = torch.as_tensor(channel_scores[member.layer]).detach().float().flatten().cpu()
            scale = scores.abs().mean()
            per_unit = scores.reshape(group.channels, -1).mean(1)
            total += per_unit / scale if scale > 0 else per_unit
            scored += 1
        if not scored:
            raise ExplorerError(f"No scores for the projections of '{group.name}': choose magnitude, taylor, "
                                "gradient, snip or wanda.")
        result[group.name] = total / scored
    return result


def remove_groups(model: nn.Module, removals: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Cut key/value groups out of ``model`` IN PLACE (call it on a copy); returns ``{attention: (heads, kv_heads)}``.

    Every attention of the model must lose the same number of groups (the config holds one count);
    the config's ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` are updated.
    """
    found = attentions(model)
    counts = {name: len({int(u) for u in torch.as_tensor(units, dtype=torch.long).flatten().tolist()})
              for name, units in removals.items()}
    unknown = [name for name in removals if name not in found]
    if unknown:
        raise ExplorerError(f"'{unknown[0]}' is not a grouped-query attention; choose one of {', '.join(found)}.")
    if len(set(counts.get(name, 0) for name in found)) > 1:
        raise ExplorerError("A Hugging Face config holds one head count for every layer: remove the same number of "
                            "key/value groups in each (local scope, no per-layer overrides).")
    result = {}
    for name, units in removals.items():
        info, module = found[name], model.get_submodule(name)
        gone = {int(u) for u in torch.as_tensor(units, dtype=torch.long).flatten().tolist()}
        if any(u < 0 or u >= info.kv_heads for u in gone):
            raise ExplorerError(f"'{name}' has {info.kv_heads} key/value groups; cannot remove {sorted(gone)}.")
        keep = [g for g in range(info.kv_heads) if g not in gone]
        if not keep:
            raise ExplorerError(f"Removing every key/value group of '{name}' would cut the network: lower the sparsity.")
        if any(hasattr(getattr(module, p), "weight_orig") for p in _PROJECTIONS):
            raise ExplorerError(f"'{name}' carries masks; fold them before removing key/value groups.")
        d, rows_q = info.head_dim, info.groups * info.head_dim
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in keep])
        q_rows = torch.cat([torch.arange(g * rows_q, (g + 1) * rows_q) for g in keep])
        _cut(module.q_proj, q_rows, 0)
        _cut(module.k_proj, kv_rows, 0)
        _cut(module.v_proj, kv_rows, 0)
        _cut(module.o_proj, q_rows, 1)
        result[name] = (len(keep) * info.groups, len(keep))
    config = getattr(model, "config", None) or getattr(getattr(model, "hf", None), "config", None)
    if result and config is not None:
        heads, kv_heads = next(iter(result.values()))
        config.head_dim = next(iter(found.values())).head_dim
        config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    return result


def _cut(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
        if dim == 0:
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
            linear.out_features = len(index)
        else:
            linear.in_features = len(index)


def kv_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{attention: (query heads, key/value heads)}`` of every grouped-query attention."""
    return {name: (info.heads, info.kv_heads) for name, info in attentions(model).items()}
