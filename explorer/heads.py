"""Attention heads and FFN neurons as the units of structured pruning in a transformer.

Torch-pruning traces a BERT-style encoder into coupled channel groups: per layer, the query,
key and value projections with the attention output's input columns (one group), and the FFN's
intermediate neurons with the next projection's input columns (another). A channel of the
attention group is one dimension of one head. Removing arbitrary dimensions would leave heads of
different sizes, which the attention reshape cannot take. So the ``head`` structure prunes
**whole heads** there (``head_dim`` channels at a time) and single neurons in the FFN groups.

`attention_of` finds which groups are attention (a parent module with ``num_attention_heads``
and ``attention_head_size``: BERT, RoBERTa, MiniLM, ...). `head_scores` turns group channel
scores into one score per head. `expand` maps pruned heads back to channel indices for
`structural.apply`, and `fix_head_counts` updates each attention module's head count, so the
pruned model runs, saves and reloads. GPT-2's fused ``c_attn`` projection is not split here:
such a model gets one line that says to use unstructured or N:M pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.structural import ChannelGroup

HEAD_ATTRIBUTES = ("num_attention_heads", "attention_head_size")


@dataclass(frozen=True)
class HeadInfo:
    """The attention module behind a channel group: its name, head count and head size."""

    module: str
    heads: int
    head_dim: int


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def attention_of(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, HeadInfo]:
    """The channel groups whose out-layers are one attention module's projections, by group name."""
    modules = dict(model.named_modules())
    found: dict[str, HeadInfo] = {}
    for group in groups:
        parents = {_parent(layer) for layer in group.out_layers()}
        if len(parents) != 1:
            continue
        parent_name = parents.pop()
        parent = modules.get(parent_name)
        if parent is None or not all(hasattr(parent, attr) for attr in HEAD_ATTRIBUTES):
            continue
        heads, head_dim = int(parent.num_attention_heads), int(parent.attention_head_size)
        if heads * head_dim != group.channels:
            raise ExplorerError(f"Attention '{parent_name}' says {heads} heads of {head_dim} but its projections have "
                                f"{group.channels} channels; it cannot be pruned by heads.")
        found[group.name] = HeadInfo(parent_name, heads, head_dim)
    return found


def units_of_head_structure(groups: list[ChannelGroup], attention: dict[str, HeadInfo]) -> list[ChannelGroup]:
    """The groups the ``head`` structure prunes: attention groups and plain neuron groups.

    A neuron group is one whose every member is a Linear layer (an FFN's intermediate neurons, a
    pooler). The residual stream's group (embeddings, every block's output, LayerNorms) is left
    out: it is the model's width, not a head or a neuron.
    """
    return [g for g in groups if g.name in attention or all(m.type.lower() == "linear" for m in g.members)]


def check_supported(model: nn.Module) -> None:
    """Refuse, in one line, a model whose attention this module cannot prune by heads (GPT-2's fused qkv)."""
    for name, module in model.named_modules():
        if hasattr(module, "c_attn") and hasattr(module, "num_heads"):
            raise ExplorerError(f"'{name}' computes query, key and value in one fused projection (GPT-2 style), "
                                "which head pruning does not split; use --structure unstructured or nm.")


def head_scores(group_scores: dict[str, torch.Tensor], attention: dict[str, HeadInfo]) -> dict[str, torch.Tensor]:
    """One score per unit: the mean channel score of each head for attention groups, neurons unchanged."""
    result = {}
    for name, scores in group_scores.items():
        info = attention.get(name)
        result[name] = scores.reshape(info.heads, info.head_dim).mean(1) if info is not None else scores
    return result


def expand(prune_units: dict[str, torch.Tensor], attention: dict[str, HeadInfo]) -> dict[str, torch.Tensor]:
    """Channel indices to remove: every dimension of each pruned head; neuron indices unchanged."""
    result = {}
    for name, units in prune_units.items():
        info = attention.get(name)
        if info is None:
            result[name] = units
            continue
        offsets = torch.arange(info.head_dim)
        result[name] = (units.reshape(-1, 1) * info.head_dim + offsets).reshape(-1)
    return result


def fix_head_counts(model: nn.Module, attention: dict[str, HeadInfo]) -> dict[str, int]:
    """After channels went, set each attention module's head count to match its projections."""
    modules = dict(model.named_modules())
    counts = {}
    for group_name, info in attention.items():
        module = modules[info.module]
        channels = modules[group_name].weight.shape[0]
        if channels % info.head_dim:
            raise ExplorerError(f"'{info.module}' was left with {channels} channels, not whole heads of {info.head_dim}.")
        module.num_attention_heads = channels // info.head_dim
        if hasattr(module, "all_head_size"):
            module.all_head_size = channels
        counts[info.module] = module.num_attention_heads
    return counts


def head_counts(model: nn.Module) -> dict[str, int]:
    """The head count of every attention module (what a pruned model reports and saves)."""
    return {name: int(module.num_attention_heads) for name, module in model.named_modules()
            if all(hasattr(module, attr) for attr in HEAD_ATTRIBUTES)}
