"""A transformer's repeated blocks: which Linears the LLM papers prune, and running them one at a time.

Wanda and SparseGPT prune "the linear layers of the transformer blocks" and leave the rest
dense: the embeddings, the LM head (tied to the embeddings or not) and any pooler or classifier.
Their reference code walks the stack of blocks (``model.layers``, ``transformer.h``,
``decoder.layers``, ``encoder.layer``) and never looks outside it. `find_blocks` finds that stack
in any model without knowing its class: the ``nn.ModuleList`` holding the most parameters whose
entries all hold a Linear (or GPT-2's ``Conv1D``); `outside_blocks` names the prunable layers
left outside, which the pipeline keeps dense on a causal language model unless asked.

Example::

    stack = find_blocks(model)                      # ("hf.transformer.h", [block0, block1, ...])
    outside_blocks(model)                           # ["hf.lm_head"]
"""
from __future__ import annotations

from torch import nn

from explorer import llm


def _holds_a_layer(module: nn.Module) -> bool:
    return any(isinstance(sub, nn.Linear) or llm.is_transposed(sub) for sub in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """``(name, blocks)`` of the model's stack of transformer blocks, or None when it has none.

    The stack is the ``nn.ModuleList`` with the most parameters among those of two or more
    entries (one, for a one-block model) that each hold a Linear; a nested list (a block's own
    list of experts) is never chosen over the list that holds it, since it holds fewer parameters.
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(_holds_a_layer(block) for block in module):
            continue
        size = sum(parameter.numel() for parameter in module.parameters())
        if size > best_size:
            best, best_size = (name, list(module)), size
    return best


def block_prefixes(model: nn.Module) -> list[str] | None:
    """The module-name prefix of each block (``"hf.transformer.h.0."`` ...), or None without blocks."""
    found = find_blocks(model)
    if found is None:
        return None
    stack, blocks = found
    return [f"{stack}.{index}." if stack else f"{index}." for index in range(len(blocks))]


def outside_blocks(model: nn.Module, names=None) -> list[str]:
    """The prunable layers (of ``names``, default all of `llm.llm_layers`) outside the transformer blocks.

    Empty when the model has no stack of blocks (a CNN, an MLP): then nothing is outside.
    """
    prefixes = block_prefixes(model)
    if prefixes is None:
        return []
    names = list(llm.llm_layers(model)) if names is None else list(names)
    return [name for name in names if not name.startswith(tuple(prefixes))]


def is_causal_lm(model: nn.Module) -> bool:
    """True for a wrapped Hugging Face causal language model (`explorer.hf.TokenModel`, task causal_lm)."""
    return getattr(model, "task", None) == "causal_lm" and hasattr(model, "hf")
