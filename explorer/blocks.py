"""A transformer's repeated blocks: which Linears the LLM papers prune, and running them one at a time.

Wanda and SparseGPT prune "the linear layers of the transformer blocks" and leave the rest
dense: the embeddings, the LM head (tied to the embeddings or not) and any pooler or classifier.
Their reference code walks the stack of blocks (``model.layers``, ``transformer.h``,
``decoder.layers``, ``encoder.layer``) and never looks outside it. `find_blocks` finds that stack
in any model without knowing its class: the ``nn.ModuleList`` holding the most parameters whose
entries all hold a Linear (or GPT-2's ``Conv1D``); `outside_blocks` names the prunable layers
left outside, which the pipeline keeps dense on a causal language model unless asked.

`sequential_prune` is the papers' layer-by-layer loop: capture the inputs of block 0 for every
calibration batch, then for each block run it with its Linears hooked (statistics from the real
tokens only), prune its Linears, and run the pruned block again to give the next block its inputs.
Each block is thus calibrated on the outputs of the already pruned blocks before it ("sequential");
the one-pass variant (`explorer.llm.wanda_scores`, `explorer.llm.hessians` on the dense model)
calibrates every layer on the dense model's activations.

Example::

    stack = find_blocks(model)                      # ("hf.transformer.h", [block0, block1, ...])
    outside_blocks(model)                           # ["hf.lm_head"]
    sequential_prune(copy, calib, "wanda", {name: 0.5 for name in block_layers})
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from explorer import llm, masking
from explorer.errors import ExplorerError
from explorer.layers import effective_weight

SEQUENTIAL_CRITERIA = ("wanda", "sparsegpt")


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


class _Captured(ExplorerError):
    """Raised by the hook on block 0 once it has its inputs: the rest of the model need not run.

    An ExplorerError so that `explorer.llm`'s forward lets it through unwrapped.
    """


def capture_block_inputs(model: nn.Module, calib: Iterable) -> list[dict]:
    """Block 0's call for every calibration batch: ``{"args", "kwargs", "mask"}`` (mask: real tokens or None).

    The model runs up to block 0 only (embeddings, position encodings, attention masks), as the
    reference code's ``Catcher`` does; every later block is then called with the same extra
    arguments (attention mask, positions, rotary embeddings) and its predecessor's output.
    """
    found = find_blocks(model)
    if found is None:
        raise ExplorerError("Sequential calibration needs a transformer with a stack of blocks; this model has none: "
                            "use one-pass calibration.")
    first = found[1][0]
    device = next(model.parameters()).device
    captured: list[dict] = []
    mask: dict = {}

    def catch(module, args, kwargs):
        captured.append({"args": args, "kwargs": kwargs, "mask": mask.get("now")})
        raise _Captured

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calib:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                mask["now"] = llm.token_mask(model, inputs)
                try:
                    llm._forward(model, inputs, device)
                except _Captured:
                    continue
                raise ExplorerError("The model never called its first transformer block; sequential calibration "
                                    "cannot follow it: use one-pass calibration.")
    finally:
        handle.remove()
    if not captured:
        raise ExplorerError("The calibration data is empty: sequential calibration needs at least one batch.")
    return captured


def _run_block(block: nn.Module, call: dict) -> torch.Tensor:
    output = block(*call["args"], **call["kwargs"])
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(call: dict, hidden: torch.Tensor) -> dict:
    if call["args"]:
        return {**call, "args": (hidden, *call["args"][1:])}
    return {**call, "kwargs": {**call["kwargs"], "hidden_states": hidden}}


def _statistics(block: nn.Module, layers: Mapping[str, nn.Module], calls: list[dict], criterion: str,
                outputs: list | None = None) -> dict:
    """Run ``block`` on every call with its ``layers`` hooked: Wanda's Σx² or SparseGPT's H = 2/N Σxxᵀ.

    ``outputs``, a list, receives the block's output for each call (the dense outputs, for one-pass
    calibration block by block: `explorer.stream`).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict = {}

    def observer(name):
        def hook(module, inputs, output):
            if current.get("source") is inputs[0] and not hasattr(module, "kernel_size"):  # rows as is (no unfold)
                total, count = current["total"], current["count"]  # q/k/v, gate/up: one input, one product
            else:
                rows = llm.real_rows(module, inputs[0].detach(), current.get("mask"))
                rows = rows.reshape(-1, rows.shape[-1]).double() if criterion == "wanda" else \
                    llm._input_rows(module, rows)
                total = rows.pow(2).sum(0) if criterion == "wanda" else rows.t() @ rows
                count = rows.shape[0]
                if not hasattr(module, "kernel_size"):
                    current.update(source=inputs[0], total=total, count=count)
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + count
        return hook

    handles = [module.register_forward_hook(observer(name)) for name, module in layers.items()]
    try:
        for call in calls:
            current.clear()
            current["mask"] = call["mask"]
            output = _run_block(block, call)
            if outputs is not None:
                outputs.append(output)
    finally:
        current.clear()
        for handle in handles:
            handle.remove()
    if criterion == "wanda":
        return sums
    return {name: sums[name] * (2.0 / counts[name]) for name in sums if counts[name]}


def _wanda_mask(module: nn.Module, squares: torch.Tensor, pruned: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask of one layer: the ``pruned`` weights of lowest within-row rank of ``|W|·‖X‖`` (or N:M)."""
    weight = effective_weight(module).detach().float().abs()
    norms = squares.sqrt().float()
    raw = weight * (norms[:, None] if llm.is_transposed(module) else norms)
    transposed = llm.is_transposed(module)
    if nm is not None:
        return llm.nm_mask(raw, *nm, transposed=transposed)
    if not transposed:  # the same pick without the two sorts: a 5632 x 2048 layer 0.8 s -> 0.2 s
        return ~llm.lowest_by_row_rank(raw, pruned)
    ranks = llm._within_row_ranks(raw, transposed=transposed).reshape(-1)  # flat (in, out) order breaks rank ties
    keep = torch.ones(ranks.numel(), dtype=torch.bool)
    keep[torch.argsort(ranks, stable=True)[:pruned]] = False
    return keep.reshape(raw.shape)


def sequential_prune(model: nn.Module, calib: Iterable, criterion: str, counts: Mapping[str, int], *,
                     nm: tuple[int, int] | None = None, progress: Callable[[float, str], None] | None = None,
                     one_pass: bool = False, masks: bool = True) -> None:
    """Prune ``model`` IN PLACE block by block, each block calibrated on the pruned blocks before it.

    ``counts`` is ``{layer: weights to prune}`` (a plan's per-layer counts; layers left out or at 0 stay
    dense); every named layer must sit in a transformer block. Wanda prunes each layer's lowest
    within-row ranks of ``|W|·‖X‖`` (N:M with ``nm``); SparseGPT prunes and rebuilds it from its Hessian
    (`explorer.llm.sparsegpt_prune`). Padding never enters the statistics.

    ``one_pass=True`` carries the dense block's outputs to the next block instead of the pruned
    block's: every block is calibrated on the dense model's hidden states, the one-pass variant, with
    one block's statistics in memory at a time and one forward per block. ``masks=False`` writes
    plain zeros (`explorer.masking.zero_pruned`) instead of ``torch.nn.utils.prune`` masks.
    """
    if criterion not in SEQUENTIAL_CRITERIA:
        raise ExplorerError(f"Sequential calibration is for {' and '.join(SEQUENTIAL_CRITERIA)}; '{criterion}' "
                            "uses no calibration of the pruned blocks: use one-pass.")
    found = find_blocks(model)
    calls = capture_block_inputs(model, calib)
    stack, stack_blocks = found
    modules = llm.llm_layers(model)
    prefixes = block_prefixes(model)
    outside = [name for name, count in counts.items() if count and not name.startswith(tuple(prefixes))]
    if outside:
        raise ExplorerError(f"Sequential calibration prunes the transformer blocks only; {', '.join(outside)} is "
                            "outside them: protect it or use one-pass calibration.")
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for index, (block, prefix) in enumerate(zip(stack_blocks, prefixes)):
                layers = {name: modules[name] for name in modules if name.startswith(prefix) and counts.get(name)}
                dense = [] if one_pass else None
                if layers:
                    statistics = _statistics(block, layers, calls, criterion, outputs=dense)
                    if criterion == "wanda":
                        chosen = {name: _wanda_mask(layers[name], statistics[name], counts[name], nm)
                                  for name in layers if name in statistics}
                        if masks:
                            masking.set_masks(model, chosen, regrow="keep")
                        else:
                            masking.zero_pruned(model, chosen)
                    else:
                        llm.sparsegpt_prune(model, statistics, {
                            name: counts[name] / layers[name].weight.numel() for name in statistics}, nm=nm,
                            masks=masks)
                outputs = dense if dense else [_run_block(block, call) for call in calls]
                calls = [_with_hidden(call, output) for call, output in zip(calls, outputs)]
                if progress is not None:
                    progress((index + 1) / len(stack_blocks), f"{criterion} {'one-pass' if one_pass else 'sequential'}"
                                                              f": block {index + 1} of {len(stack_blocks)}")
    finally:
        for module, flag in flags.items():
            module.train(flag)
