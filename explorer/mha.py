"""``nn.MultiheadAttention`` as a first-class layer: its heads are a group, removed for real.

PyTorch's attention (``nn.TransformerEncoderLayer``, torchvision's ViT, many user models) keeps
query, key and value in one packed ``in_proj_weight`` of ``3 x heads x head_dim`` rows and calls
its ``out_proj`` without going through that Linear's ``forward``. So:

* masks, Wanda and N:M see ``in_proj_weight`` as the attention's weight (`explorer.layers`), and
  `attend` gives the input ``out_proj`` receives, which no forward hook can see;
* a **head group** (`head_groups`) is one attention's ``heads x head_dim`` inner channels: one
  unit is a head, i.e. ``head_dim`` rows of each of query, key and value and as many input
  columns of ``out_proj``; its cost per channel is counted from those tensors;
* `remove_heads` cuts the chosen heads out of the tensors and sets ``num_heads``. The inner width
  is then smaller than ``embed_dim`` (the residual stream keeps its width), which PyTorch's own
  forward cannot take, so the module becomes a `PrunedMultiheadAttention`: the same class with a
  forward that computes attention over the heads it has. `restore_pruned` does the same to a model
  rebuilt from a saved file, so a head-pruned model reloads (`explorer.models`).

torch-pruning's ``MultiheadAttentionPruner`` removes the same index from the query, key, value and
output projections together with the residual stream's channel, which mixes dimensions across
heads; `explorer.structural` therefore leaves such groups out and heads are pruned here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from explorer.errors import ExplorerError
from explorer.heads import HeadInfo
from explorer.structural import ChannelGroup, GroupMember

KIND = "attention heads"  # the kind of a head group (`ChannelGroup.kind`)


def packed_attentions(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Every ``nn.MultiheadAttention`` with one packed input projection, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None}


def unsupported(module: nn.MultiheadAttention) -> str | None:
    """Why heads of this attention cannot be removed here, or None."""
    if module.in_proj_weight is None:
        return "separate query/key/value projections (kdim or vdim differ from embed_dim)"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def _inner(module: nn.MultiheadAttention) -> int:
    return int(module.num_heads) * int(module.head_dim)


def _float_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def attend(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
           attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
           is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention's output *before* ``out_proj`` (heads concatenated), and its weights if asked.

    Same arguments and layouts as ``nn.MultiheadAttention.forward``; works for any head count,
    so it serves a pruned attention and shows what ``out_proj`` receives (Wanda, SparseGPT).
    """
    reason = unsupported(module)
    if reason is not None:
        raise ExplorerError(f"This attention uses {reason}, which head pruning does not handle; "
                            "use --structure unstructured or nm.")
    unbatched = query.dim() == 2
    if unbatched:  # (length, embed): one sequence, batch dimension added in front
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    batch_first = module.batch_first or unbatched
    if not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    heads, head_dim, inner = int(module.num_heads), int(module.head_dim), _inner(module)
    weights = module.in_proj_weight.split(inner)
    biases = module.in_proj_bias.split(inner) if module.in_proj_bias is not None else (None, None, None)
    batch, length, sources = query.shape[0], query.shape[1], key.shape[1]
    q, k, v = (F.linear(x, w, b).view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)
               for x, w, b in zip((query, key, value), weights, biases))
    mask = _float_mask(attn_mask, q)
    if mask is None and is_causal:
        mask = torch.full((length, sources), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    if mask is not None:
        mask = mask.view(1, 1, length, sources) if mask.dim() == 2 else mask.view(batch, heads, length, sources)
    padding = _float_mask(key_padding_mask, q)
    if padding is not None:
        padding = padding.view(batch, 1, 1, sources)
        mask = padding if mask is None else mask + padding
    dropout = module.dropout if module.training else 0.0
    probabilities = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        probabilities = (scores if mask is None else scores + mask).softmax(-1)
        context = F.dropout(probabilities, dropout) @ v
    else:  # the kernel PyTorch's own attention uses (and the FLOP counter skips alike)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=head_dim ** -0.5)
    context = context.transpose(1, 2).reshape(batch, length, inner)
    if not batch_first:
        context = context.transpose(0, 1)
    attention = None
    if need_weights:
        attention = probabilities.mean(1) if average_attn_weights else probabilities
        attention = attention.squeeze(0) if unbatched else attention
    if unbatched:
        context = context.squeeze(0)
    return context, attention


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` that lost heads: ``num_heads x head_dim`` is below ``embed_dim``.

    Same parameters and state-dict keys; only the forward differs (`attend`, then ``out_proj``).
    ``_qkv_same_embed_dim`` is False, which keeps ``nn.TransformerEncoderLayer`` off its fused
    kernel (that kernel assumes the inner width equals ``embed_dim``).
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        context, attention = attend(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        return F.linear(context, self.out_proj.weight, self.out_proj.bias), attention


def _as_pruned(module: nn.MultiheadAttention) -> None:
    module.__class__ = PrunedMultiheadAttention
    module._qkv_same_embed_dim = False


def restore_pruned(model: nn.Module) -> list[str]:
    """Turn every attention whose projections hold fewer heads than ``embed_dim`` into a `PrunedMultiheadAttention`.

    Called on a model rebuilt from a saved file once its tensors have the saved shapes; returns their names.
    """
    restored = []
    for name, module in packed_attentions(model).items():
        if module.in_proj_weight.shape[0] != 3 * module.embed_dim and not isinstance(module, PrunedMultiheadAttention):
            if module.in_proj_weight.shape[0] != 3 * _inner(module):
                raise ExplorerError(f"Attention '{name}' has {module.in_proj_weight.shape[0]} projection rows, not "
                                    f"3 x {module.num_heads} heads x {module.head_dim}; the file does not fit.")
            _as_pruned(module)
            restored.append(name)
    return restored


def head_groups(model: nn.Module) -> tuple[list[ChannelGroup], dict[str, HeadInfo]]:
    """One group per packed attention: its inner channels, ``head_dim`` of them a head.

    A channel ``c`` is row ``c`` of the query, key and value blocks of ``in_proj_weight`` (with
    their biases) and input column ``c`` of ``out_proj``; `ChannelGroup.params_removed` of a
    head's channels is exactly what `remove_heads` frees.
    """
    groups, infos = [], {}
    for name, module in packed_attentions(model).items():
        if unsupported(module) is not None:
            continue
        inner, embed = _inner(module), int(module.in_proj_weight.shape[1])
        rows = list(range(3 * inner))
        per_row = embed + (1 if module.in_proj_bias is not None else 0)
        members = [
            GroupMember(layer=name, type="MultiheadAttention", cut="out", channels=3 * inner, idxs=rows,
                        units=[r % inner for r in rows], params_per_channel=per_row),
            GroupMember(layer=f"{name}.out_proj", type="Linear", cut="in", channels=inner, idxs=list(range(inner)),
                        units=list(range(inner)), params_per_channel=int(module.out_proj.weight.shape[0])),
        ]
        group = ChannelGroup(name=name, kind=KIND, channels=inner, members=members,
                             params_per_channel_real=0, params_per_channel_naive=per_row,
                             root_channels=list(range(inner)))
        group.params_per_channel_real = group.params_removed(range(inner)) // inner
        groups.append(group)
        infos[name] = HeadInfo(name, int(module.num_heads), int(module.head_dim))
    return groups, infos


def remove_heads(model: nn.Module, removals: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, int]:
    """Cut heads out of ``model``'s attentions IN PLACE (call it on a copy); returns the head counts left.

    ``removals`` maps an attention's name to the heads to remove. A masked attention is refused
    (fold its masks first); an attention is never emptied.
    """
    modules = dict(model.named_modules())
    counts = {}
    for name, gone in removals.items():
        module = modules.get(name)
        if not isinstance(module, nn.MultiheadAttention):
            raise ExplorerError(f"'{name}' is not an nn.MultiheadAttention; its heads cannot be removed.")
        reason = unsupported(module)
        if reason is not None:
            raise ExplorerError(f"'{name}' uses {reason}, which head pruning does not handle; use unstructured or nm.")
        if hasattr(module, "in_proj_weight_orig") or hasattr(module.out_proj, "weight_orig"):
            raise ExplorerError(f"'{name}' carries masks; fold them (save or fine-tune) before removing heads.")
        heads, head_dim = int(module.num_heads), int(module.head_dim)
        gone = {int(h) for h in torch.as_tensor(gone, dtype=torch.long).flatten().tolist()}
        if any(h < 0 or h >= heads for h in gone):
            raise ExplorerError(f"'{name}' has {heads} heads (0..{heads - 1}); cannot remove {sorted(gone)}.")
        keep = [h for h in range(heads) if h not in gone]
        if not keep:
            raise ExplorerError(f"Removing every head of '{name}' would cut the network: lower the sparsity, "
                                "use local scope or min_keep.")
        if len(keep) == heads:
            counts[name] = heads
            continue
        inner = heads * head_dim
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
        packed = torch.cat([rows, rows + inner, rows + 2 * inner])
        with torch.no_grad():
            module.in_proj_weight = _sliced(module.in_proj_weight, packed, 0)
            if module.in_proj_bias is not None:
                module.in_proj_bias = _sliced(module.in_proj_bias, packed, 0)
            module.out_proj.weight = _sliced(module.out_proj.weight, rows, 1)
        module.out_proj.in_features = len(rows)
        module.num_heads = len(keep)
        _as_pruned(module)
        counts[name] = len(keep)
    return counts


def _sliced(parameter: nn.Parameter, index: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(parameter.detach().index_select(dim, index.to(parameter.device)).clone(),
                        requires_grad=parameter.requires_grad)


def head_counts(model: nn.Module) -> dict[str, int]:
    """The head count of every packed attention."""
    return {name: int(module.num_heads) for name, module in packed_attentions(model).items()}
