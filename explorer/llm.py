"""Post-training pruning of the LLM era: Wanda, SparseGPT, and N:M patterns for any score.

Both methods see a layer as a matrix product ``y = W x`` and look at the inputs ``x`` each
prunable layer receives on a few calibration batches (forward hooks, one no-grad pass a batch):

* **Wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") scores
  ``|W_ij| · ‖X_j‖₂`` and compares weights within each output row; no weight is changed.
* **SparseGPT** (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot") reconstructs each layer: the Hessian ``H = 2/N Σ x xᵀ`` of its
  least-squares problem chooses the mask, and OBS updates move the kept weights so that ``W x``
  changes as little as possible.

N:M semi-structured sparsity (keep ``n`` of every ``m`` consecutive weights along the input
dimension; 2:4 is what sparse tensor cores run) works with any score through
:func:`nm_scores`, and inside SparseGPT with ``nm=(n, m)``.

A layer is a matrix ``(out, in)``: a Linear's weight; a Conv's ``weight.flatten(1)``
(input channels × kernel positions, channel-major, as ``F.unfold`` lays out its inputs); a
Hugging Face ``Conv1D`` (GPT-2), which stores ``(in, out)`` and is read transposed. Calibration
batches are ``(x, y)`` pairs (``y`` ignored) or bare inputs; ``x`` is whatever the model takes:
images, token ids, or a dict of tensors passed as ``model(**x)`` (ids plus attention mask).
Models run in eval mode under ``no_grad``; their training flags are restored afterwards.

Example::

    ranking = prepare(wanda_scores(model, calib))            # any plan cuts every row alike
    hs = hessians(model, calib)
    pruned = clone_model(model)
    sparsegpt_prune(pruned, hs, {name: 0.5 for name in hs}, nm=parse_nm("2:4"))
    check_nm(pruned, 2, 4)                                    # {layer: 0 violating groups}
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from explorer import masking
from explorer.errors import ExplorerError
from explorer import mha
from explorer.layers import effective_weight, prunable_layers, weight_name, weight_of

Scores = dict[str, torch.Tensor]
Progress = Callable[[float, str], None]
MAX_M = 32
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


# ------------------------------------------------------------------------- layers


def is_transposed(module: nn.Module) -> bool:
    """True for a Hugging Face ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``.

    Recognised by shape rather than by importing transformers (slow, and maybe absent).
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None))


def llm_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The layers these functions work on, by name: ``prunable_layers`` plus Hugging Face ``Conv1D``.

    ``names`` picks some (in the given order); each must be a Linear, Conv1d, Conv2d or Conv1D.
    """
    if names is None:
        known = {name for name, _ in prunable_layers(model)}
        return {name: module for name, module in model.named_modules() if name in known or is_transposed(module)}
    modules = dict(model.named_modules())
    chosen = {}
    for name in names:
        module = modules.get(name)
        if module is None or not (isinstance(module, (nn.Linear, *_CONV_TYPES)) or is_transposed(module)
                                  or weight_name(module) == "in_proj_weight"):
            what = "no such module" if module is None else type(module).__name__
            raise ExplorerError(f"Layer {name!r} cannot be pruned here ({what}); name a Linear, Conv1d, Conv2d, "
                                "nn.MultiheadAttention or Hugging Face Conv1D layer.")
        chosen[name] = module
    return chosen


def _as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as the layer's ``(out, in)`` matrix (a view where possible)."""
    return tensor.t() if is_transposed(module) else tensor.reshape(tensor.shape[0], -1)


def _from_matrix(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_as_matrix`: back to the shape of ``module.weight``."""
    return matrix.t().contiguous() if is_transposed(module) else matrix.reshape(weight_of(module).shape)


# -------------------------------------------------------------------- calibration


def _run_calibration(model: nn.Module, calib: Iterable, layers: Mapping[str, nn.Module],
                     observe: Callable[[str, nn.Module, torch.Tensor], None],
                     progress: Progress | None, label: str) -> None:
    """Feed every calibration batch to ``model`` once, handing each layer's input to ``observe``."""
    if calib is None:
        raise ExplorerError(f"{label} needs calibration data: pass calib=[(inputs, labels), ...] batches.")
    try:
        expected = len(calib)
    except TypeError:
        expected = None
    device = next(model.parameters()).device
    real = {}  # the batch's token mask: True where a token is real, False on padding
    handles = [_hook(model, name, module, observe, real) for name, module in layers.items()]
    flags = {module: module.training for module in model.modules()}
    model.eval()
    done = 0
    try:
        with torch.no_grad():
            for batch in calib:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                real["mask"] = token_mask(model, inputs)
                _forward(model, inputs, device)
                done += 1
                if progress is not None:
                    progress(min(1.0, done / expected) if expected else 1 - 1 / (1 + done), f"{label}: batch {done}")
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.train(flag)
    if done == 0:
        raise ExplorerError(f"The calibration data is empty: {label} needs at least one batch.")


def token_mask(model: nn.Module, inputs) -> torch.Tensor | None:
    """Which positions of a batch are real tokens (True) rather than padding, or None when unknown.

    Token ids of a model with a ``pad_id`` (`explorer.hf.TokenModel`) are real where ``ids != pad_id``,
    as the model's own attention mask says; a dict of inputs gives its ``attention_mask``.
    """
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    pad_id = getattr(model, "pad_id", None)
    if isinstance(pad_id, int) and isinstance(inputs, torch.Tensor) and inputs.dim() == 2 \
            and not inputs.is_floating_point():
        return inputs != pad_id
    return None


def real_rows(module: nn.Module, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear's ``(batch, sequence, in)`` inputs without the padded positions: ``(real tokens, in)``.

    Padding must not enter the calibration statistics (Wanda's norms, SparseGPT's Hessians): its
    hidden states are computed but attended by nothing, and on short padded lines they can be most
    of the rows. Inputs of another shape, and conv layers, pass unchanged.
    """
    if (mask is None or isinstance(module, _CONV_TYPES) or inputs.dim() < 3
            or tuple(inputs.shape[:2]) != tuple(mask.shape)):
        return inputs
    return inputs[mask.to(inputs.device)]


def _hook(model: nn.Module, name: str, module: nn.Module, observe, real: dict):
    """A forward hook handing ``module``'s input to ``observe``.

    An attention's ``out_proj`` is never called (the attention reads its weight), so its input,
    the heads' concatenated output, is recomputed by a hook on the attention (`mha.attend`).
    """
    parent = model.get_submodule(name.rpartition(".")[0]) if name.endswith("out_proj") else None
    if not isinstance(parent, nn.MultiheadAttention) or mha.unsupported(parent) is not None:
        return module.register_forward_hook(_observer(name, observe, real))

    def hook(attention, args, kwargs, output):
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        call = {**dict(zip(names, args)), **kwargs, "need_weights": False}
        observe(name, module, real_rows(module, mha.attend(attention, **call)[0].detach(), real.get("mask")))
    return parent.register_forward_hook(hook, with_kwargs=True)


def _observer(name: str, observe: Callable[[str, nn.Module, torch.Tensor], None], real: dict):
    def hook(module, inputs, output):
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise ExplorerError(f"Layer {name!r} was called without a positional input tensor; "
                                "it cannot be calibrated: leave it out (layers=...).")
        observe(name, module, real_rows(module, inputs[0].detach(), real.get("mask")))
    return hook


def _forward(model: nn.Module, inputs, device: torch.device) -> None:
    try:
        if isinstance(inputs, Mapping):
            model(**{key: value.to(device) if isinstance(value, torch.Tensor) else value
                     for key, value in inputs.items()})
        else:
            model(inputs.to(device))
    except ExplorerError:
        raise
    except Exception as error:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ExplorerError(f"The model failed on a calibration batch of {shape} "
                            f"({type(error).__name__}: {error}); give calibration inputs the model accepts.") from error


def _input_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of its matrix product: ``(rows, in)`` with ``y_row = W @ row`` (groups=1)."""
    if not isinstance(module, _CONV_TYPES):
        return inputs.reshape(-1, inputs.shape[-1]).float()
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if inputs.dim() == spatial + 1:
        inputs = inputs.unsqueeze(0)
    pads = []
    for size, dilation, padding in zip(module.kernel_size, module.dilation, _paddings(module)):
        total = dilation * (size - 1) if padding == "same" else 2 * (0 if padding == "valid" else padding)
        pads.append((total // 2, total - total // 2))
    flat_pads = [side for pair in reversed(pads) for side in pair]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    inputs = F.pad(inputs.float(), flat_pads, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if spatial == 1:
        inputs, kernel, dilation, stride = inputs.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    columns = F.unfold(inputs, kernel, dilation=dilation, stride=stride)  # (batch, in·k, positions)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _paddings(module: nn.Module) -> tuple:
    return (module.padding,) * len(module.kernel_size) if isinstance(module.padding, str) else module.padding


# ------------------------------------------------------------------------- Wanda


def wanda_raw(model: nn.Module, calib: Iterable, *, layers: Iterable[str] | None = None,
              progress: Progress | None = None) -> Scores:
    """Wanda's raw score ``|W_ij| · ‖X_j‖₂``, shaped like each weight (float32, CPU).

    ``‖X_j‖₂`` is the L2 norm of input feature ``j`` over every row the layer saw: all leading
    dimensions of a Linear's input (batch, sequence) are rows. For a Conv it is the norm of
    input channel ``j`` over batch and spatial positions, broadcast over the kernel (and over
    the channels of each group). A layer the calibration data never reaches is left out.
    """
    modules = llm_layers(model, layers)
    squares: dict[str, torch.Tensor] = {}

    def observe(name, module, inputs):
        if isinstance(module, _CONV_TYPES):
            channels = inputs.unsqueeze(0) if inputs.dim() == weight_of(module).dim() - 1 else inputs
            total = channels.double().pow(2).sum(dim=[d for d in range(channels.dim()) if d != 1])
        else:
            total = inputs.reshape(-1, inputs.shape[-1]).double().pow(2).sum(0)
        squares[name] = squares[name] + total if name in squares else total

    _run_calibration(model, calib, modules, observe, progress, "wanda")
    scores = {}
    for name, module in modules.items():
        if name not in squares:
            continue
        weight = effective_weight(module).detach().float().abs()
        norms = squares[name].sqrt().float()
        if isinstance(module, _CONV_TYPES):
            per_group = norms.reshape(module.groups, -1).repeat_interleave(weight.shape[0] // module.groups, dim=0)
            norms = per_group.reshape(*per_group.shape, *(1,) * (weight.dim() - 2))
        elif is_transposed(module):
            norms = norms[:, None]
        scores[name] = (weight * norms.to(weight.device)).cpu()
    return scores


def wanda_scores(model: nn.Module, calib: Iterable, *, layers: Iterable[str] | None = None,
                 progress: Progress | None = None) -> Scores:
    """Wanda scores as within-row percentiles: each weight's rank in its output row / row length.

    Wanda prunes the same fraction of every output row (the paper's per-output comparison
    group). The planner cuts per layer (local) or across layers (global); scoring each weight
    by its rank in its row, in [0, 1), makes either cut take the lowest ``|W|·‖X‖`` of every
    row in equal measure (within one weight per row), so any plan is Wanda's. Ties rank by
    raw score, then by index. Raw scores: :func:`wanda_raw`.
    """
    raw = wanda_raw(model, calib, layers=layers, progress=progress)
    modules = llm_layers(model, raw)
    return {name: _within_row_ranks(score, transposed=is_transposed(modules[name])) for name, score in raw.items()}


def _within_row_ranks(scores: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Each entry's rank within its output row divided by the row length (stable: ties by index)."""
    matrix = scores.t() if transposed else scores.reshape(scores.shape[0], -1)
    order = torch.argsort(matrix, dim=1, stable=True)
    positions = torch.arange(matrix.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).float() / matrix.shape[1]
    return ranks.t().contiguous() if transposed else ranks.reshape(scores.shape)


def row_lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Which entries of each row of ``values`` (rows, n) are its ``count`` lowest, ties going to the lower column.

    The choice a stable sort of each row makes, found with one k-th value per row and a count of the ties
    instead of sorting (a sort of a 11008 x 4096 weight takes ~6 s on this CPU, this ~1.5 s).
    """
    rows, width = values.shape
    if count <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if count >= width:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, count, dim=1, keepdim=True).values
    chosen = values < threshold
    ties = values == threshold
    need = count - chosen.sum(1, keepdim=True)
    crowded = (ties.sum(1, keepdim=True) > need).squeeze(1)  # rows where only the first ties are taken
    if crowded.any():
        some = ties[crowded]
        ties[crowded] = some & (some.cumsum(1) <= need[crowded])
    return chosen | ties


def lowest_by_row_rank(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """Wanda's pick (`explorer.blocks._wanda_mask`) without sorting: the ``pruned`` entries of lowest within-row rank.

    Ranked by row position, then row: every row gives its ``pruned // rows`` lowest, and the first
    ``pruned % rows`` rows one more.
    """
    rows = scores.shape[0]
    each, extra = divmod(pruned, rows)
    chosen = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if extra:
        chosen[:extra] = row_lowest(scores[:extra], each + 1)
    chosen[extra:] = row_lowest(scores[extra:], each)
    return chosen



# --------------------------------------------------------------------------- N:M


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive weights, with 1 <= N < M <= 32."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if match is None:
        raise ExplorerError(f"N:M must look like '2:4' (keep N of every M consecutive weights), got {text!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    _check_nm(n, m)
    return n, m


def _check_nm(n, m) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 1 <= n < m <= MAX_M:
        raise ExplorerError(f"N:M needs integers 1 <= N < M <= {MAX_M}, got {n}:{m}; 2:4 and 4:8 are the usual ones.")


def _input_width(score: torch.Tensor, transposed: bool) -> int:
    return score.shape[0] if transposed else score[0].numel()


def nm_misfits(scores: Mapping[str, torch.Tensor], m: int, *, transposed: Iterable[str] = ()) -> list[str]:
    """Layers whose input width is not a multiple of ``m``: they cannot be N:M; leave them out."""
    transposed = set(transposed)
    return [name for name, score in scores.items() if score.dim() < 2 or _input_width(score, name in transposed) % m]


def nm_scores(scores: Mapping[str, torch.Tensor], n: int, m: int, *, transposed: Iterable[str] = ()) -> Scores:
    """Turn any per-weight scores into scores whose lowest ``(m - n)/m`` are an exact N:M pattern.

    Groups are ``m`` consecutive weights along the input dimension: a Linear's rows, a Conv
    filter flattened as ``in_channels × kh × kw`` (channel-major), a ``Conv1D`` in ``transposed``
    along its first dimension. Key = rank within the group (0 .. m-1) + half the weight's
    within-layer percentile (< 0.5, so float32 keeps groups apart): a local or global plan at
    sparsity ``(m - n)/m`` prunes exactly the ``m - n`` lowest of every group, and other
    sparsities still prefer low group ranks. A layer that does not fit raises ExplorerError
    (find them first with :func:`nm_misfits` and leave them out, which keeps them dense).
    """
    _check_nm(n, m)
    transposed = set(transposed)
    misfits = nm_misfits(scores, m, transposed=transposed)
    if misfits:
        name = misfits[0]
        raise ExplorerError(f"Layer {name!r} has {_input_width(scores[name], name in transposed)} inputs per output, "
                            f"not a multiple of {m}, so it cannot be {n}:{m}; protect it (leave it out of the scores).")
    return {name: _nm_keys(score, m, name in transposed) for name, score in scores.items()}


def _nm_keys(score: torch.Tensor, m: int, transposed: bool) -> torch.Tensor:
    matrix = score.detach().to("cpu", torch.float32)
    matrix = matrix.t() if transposed else matrix.reshape(matrix.shape[0], -1)
    flat = matrix.reshape(-1)
    order = torch.argsort(flat, stable=True)
    layer_rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel()))
    groups = layer_rank.reshape(matrix.shape[0], -1, m)
    group_rank = torch.argsort(torch.argsort(groups, dim=-1), dim=-1)
    keys = (group_rank.double() + 0.5 * layer_rank.reshape(groups.shape).double() / flat.numel()).float()
    keys = keys.reshape(matrix.shape)
    return keys.t().contiguous() if transposed else keys.reshape(score.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int, *, transposed: bool = False) -> torch.Tensor:
    """One layer's N:M mask (True = kept): the ``n`` best of every ``m`` consecutive input weights.

    The same mask the planner route (:func:`nm_scores`, then a plan at ``(m - n)/m``) gives;
    among equal scores the lower index is pruned first, as in the planner.
    """
    return nm_scores({"layer": scores}, n, m, transposed=["layer"] if transposed else [])["layer"] >= m - n


def check_nm(model: nn.Module, n: int, m: int, *, layers: Iterable[str] | None = None) -> dict[str, int]:
    """``{layer: groups of m holding more than n non-zeros}`` in the effective weights; all 0 = N:M holds.

    Layers whose input width is not a multiple of ``m`` cannot hold the pattern and are left out.
    """
    _check_nm(n, m)
    result = {}
    for name, module in llm_layers(model, layers).items():
        matrix = _as_matrix(module, effective_weight(module).detach())
        if matrix.shape[1] % m:
            continue
        nonzero = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(dim=-1)
        result[name] = int((nonzero > n).sum())
    return result


# ---------------------------------------------------------------------- SparseGPT


def hessians(model: nn.Module, calib: Iterable, *, layers: Iterable[str] | None = None,
             progress: Progress | None = None) -> Scores:
    """Each layer's ``H = 2/N Σ x xᵀ`` over its N calibration input rows: ``(in, in)`` float32.

    Inputs come from the model as given, in one pass (the paper's parallel variant); the
    sequential variant, which feeds each block the outputs of the already pruned blocks, is not
    done. Conv inputs are unfolded into rows (``in_channels · kh · kw``). N counts rows (tokens,
    positions), not sequences; memory is ``4 · in²`` bytes per layer. Left out, so that plans
    keep them dense: layers the calibration data never reaches, and grouped (depthwise) convs,
    whose groups would each need their own Hessian.
    """
    modules = {name: module for name, module in llm_layers(model, layers).items() if getattr(module, "groups", 1) == 1}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name, module, inputs):
        rows = _input_rows(module, inputs)
        product = rows.t() @ rows
        sums[name] = sums[name] + product if name in sums else product
        counts[name] = counts.get(name, 0) + rows.shape[0]

    _run_calibration(model, calib, modules, observe, progress, "sparsegpt")
    return {name: (sums[name] * (2.0 / counts[name])).cpu() for name in modules if name in sums and counts[name]}


def _inverse_cholesky(name: str, hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of the dampened ``H⁻¹`` (``UᵀU = H⁻¹``), and the dead inputs.

    Dead inputs (``H_jj = 0``: always zero on the calibration data) get ``H_jj = 1`` as in the
    reference code; dampening adds ``percdamp · mean(diag H)`` to the diagonal.
    """
    matrix = hessian.detach().to("cpu", torch.float64).clone()
    dead = matrix.diagonal() == 0
    matrix.diagonal()[dead] = 1.0
    matrix.diagonal().add_(percdamp * matrix.diagonal().mean())
    # With J the reversal, J H J = L Lᵀ gives H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J): U = J L⁻¹ J, the same factor as the
    # reference's cholesky(cholesky_inverse(cholesky(H)), upper=True), for one factorisation and one
    # triangular solve (about 5x less time at 3,072 inputs).
    lower, info = torch.linalg.cholesky_ex(matrix.flip(0, 1))
    if int(info) != 0:
        raise ExplorerError(f"Layer {name!r}: its Hessian is not positive definite even with dampening "
                            f"{percdamp}; use more calibration data or a larger percdamp.")
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    upper = torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)
    return upper.float(), dead


def _checked_hessian(name: str, module: nn.Module, hs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    columns = _as_matrix(module, weight_of(module)).shape[1]
    if name not in hs:
        raise ExplorerError(f"No Hessian for layer {name!r}: compute hessians(model, calib) with it included.")
    if tuple(hs[name].shape) != (columns, columns):
        raise ExplorerError(f"Layer {name!r}: its Hessian is {tuple(hs[name].shape)} but the layer has {columns} "
                            "inputs; compute the Hessians on this model.")
    return hs[name]


def sparsegpt_scores(model: nn.Module, hs: Mapping[str, torch.Tensor], *, percdamp: float = 0.01) -> Scores:
    """SparseGPT's OBS saliency ``w² / U_jj²`` for a preview plan (the real masks come from pruning).

    ``U_jj² = [H_F⁻¹]_jj`` is the inverse Hessian of the columns from ``j`` on, as the column
    sweep sees it, so this is the output error of removing ``w`` alone: the quantity
    :func:`sparsegpt_prune` ranks by, before its updates change the weights. Dead inputs score 0.
    """
    _check_fraction_positive(percdamp, "percdamp")
    modules = llm_layers(model, hs)
    scores = {}
    for name, module in modules.items():
        upper, dead = _inverse_cholesky(name, _checked_hessian(name, module, hs), percdamp)
        matrix = _as_matrix(module, effective_weight(module).detach()).float().cpu()
        saliency = matrix.pow(2) / upper.diagonal().pow(2)
        saliency[:, dead] = 0.0
        scores[name] = _from_matrix(module, saliency)
    return scores


def _check_fraction_positive(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ExplorerError(f"{what} must be a positive number, got {value!r}.")


def sparsegpt_prune(model: nn.Module, hs: Mapping[str, torch.Tensor], sparsity: Mapping[str, float] | float, *,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                    progress: Progress | None = None, masks: bool = True) -> None:
    """Prune ``model`` IN PLACE with SparseGPT: masks chosen and kept weights updated per layer.

    ``sparsity`` is ``{layer: fraction}`` (a plan's per-layer sparsities; 0 leaves a layer
    alone) or one fraction for every layer of ``hs``. Per layer, columns are swept in blocks of
    ``blocksize``: at each block start the mask takes the block's share of the layer's pruned
    count (exact in total) with the lowest ``w²/U_jj²``; each pruned weight's error is spread over
    the block's later columns (OBS), and over later blocks in one lazy matrix product. With
    ``nm=(n, m)`` each group of ``m`` columns prunes its ``m - n`` lowest per row instead; every
    named layer must then ask for ``(m - n)/m`` (or 0). Weights the model's mask already pruned
    stay pruned. New weights go into the layer and its zeros into masks
    (``torch.nn.utils.prune``, through :func:`explorer.masking.set_masks`); with ``masks=False`` only the
    weights are written, their pruned entries exact zeros (no mask: no memory beyond the model). Everything is
    checked first; only a Hessian that cannot be inverted stops midway, leaving earlier layers
    pruned (prune a copy). The work runs on the layer's device.
    """
    _check_fraction_positive(percdamp, "percdamp")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ExplorerError(f"blocksize must be a positive integer, got {blocksize!r}.")
    if nm is not None:
        _check_nm(*nm)
        blocksize = -(-blocksize // nm[1]) * nm[1]  # groups never straddle blocks
    targets = dict(sparsity) if isinstance(sparsity, Mapping) else {name: sparsity for name in hs}
    modules = llm_layers(model, targets)
    for name, fraction in targets.items():
        _check_target(model, name, modules[name], fraction, nm, hs)
    known = {name for name, _ in prunable_layers(model)}
    for index, (name, fraction) in enumerate(targets.items()):
        module = modules[name]
        if fraction > 0:
            device = weight_of(module).device
            upper, dead = _inverse_cholesky(name, _checked_hessian(name, module, hs), percdamp)
            weight = _as_matrix(module, effective_weight(module).detach()).float().clone()
            mask = getattr(module, weight_name(module) + "_mask", None)
            already = None if mask is None else _as_matrix(module, mask) == 0
            pruned = _sweep(weight, upper.to(device), dead.to(device), float(fraction), nm, blocksize, already)
            if masks:
                _write(model, name, module, weight, ~pruned, known)
            else:
                with torch.no_grad():
                    weight_of(module).copy_(_from_matrix(module, weight))
        if progress is not None:
            progress((index + 1) / len(targets), f"sparsegpt: layer {name}")


def _check_target(model: nn.Module, name: str, module: nn.Module, fraction, nm, hs) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ExplorerError(f"Sparsity of layer {name!r} must be a number between 0 and 1, got {fraction!r}.")
    if fraction > 0:
        if getattr(module, "groups", 1) != 1:
            raise ExplorerError(f"Layer {name!r} is a grouped convolution, which SparseGPT does not prune; protect it.")
        _checked_hessian(name, module, hs)
        _check_untied(model, name, module)
    if nm is not None and fraction > 0:
        n, m = nm
        if abs(fraction - (m - n) / m) > 1e-6:
            raise ExplorerError(f"{n}:{m} prunes exactly {(m - n) / m:.0%} of a layer, but layer {name!r} asks for "
                                f"{fraction:.2%}; plan at sparsity {(m - n) / m} or protect the layer.")
        columns = _as_matrix(module, weight_of(module)).shape[1]
        if columns % m:
            raise ExplorerError(f"Layer {name!r} has {columns} inputs per output, not a multiple of {m}, so it "
                                f"cannot be {n}:{m}; protect it.")


def tied_with(model: nn.Module, name: str) -> list[str]:
    """The other parameters that are the very tensor of layer ``name``'s weight (tied weights)."""
    module = model.get_submodule(name)
    parameter = getattr(module, weight_name(module) + "_orig", weight_of(module))
    return [other for other, tensor in model.named_parameters(remove_duplicate=False)
            if tensor is parameter and not other.startswith(f"{name}.")]


def _check_untied(model: nn.Module, name: str, module: nn.Module) -> None:
    sharing = tied_with(model, name)
    if sharing:
        raise ExplorerError(f"Layer {name!r} shares its weight with {', '.join(sharing)} (tied weights, e.g. an LM "
                            "head tied to the embeddings): SparseGPT's updates would change both; protect it.")


def _sweep(weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor, fraction: float,
           nm: tuple[int, int] | None, blocksize: int, already: torch.Tensor | None) -> torch.Tensor:
    """SparseGPT's column sweep on ``weight`` (out, in), updated in place; returns the pruned mask.

    A block is held transposed, ``(columns, rows)``, so that each column's rank-1 OBS update
    touches contiguous memory.
    """
    rows, columns = weight.shape
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    diagonal = upper.diagonal()
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        block = weight[:, start:stop].t().contiguous()
        inverse, block_diagonal, block_dead = upper[start:stop, start:stop], diagonal[start:stop], dead[start:stop]
        block_already = None if already is None else already[:, start:stop]
        errors = torch.zeros_like(block)
        if nm is None:
            count = round(fraction * rows * stop) - round(fraction * rows * start)
            pruned[:, start:stop] = _lowest(block.t(), block_diagonal, block_dead, block_already, count)
        block_pruned = pruned[:, start:stop].t().contiguous()
        for column in range(stop - start):
            if nm is not None and column % nm[1] == 0:
                group = slice(column, column + nm[1])
                chosen = _lowest_per_row(block[group].t(), block_diagonal[group], block_dead[group],
                                         None if block_already is None else block_already[:, group], nm[1] - nm[0])
                block_pruned[group] = chosen.t()
            error = block[column].masked_fill(~block_pruned[column], 0.0) / inverse[column, column]
            block[column:].addmm_(inverse[column, column:, None], error[None], alpha=-1.0)  # addr_ ran ~100x slower
            block[column].masked_fill_(block_pruned[column], 0.0)  # exactly zero, not a rounding residue
            errors[column] = error
        pruned[:, start:stop] = block_pruned.t()
        weight[:, start:stop] = block.t()
        weight[:, stop:].addmm_(errors.t(), upper[start:stop, stop:], alpha=-1.0)
    return pruned


def _saliency(values, diagonal, dead, already) -> torch.Tensor:
    saliency = values.pow(2) / diagonal.pow(2)
    saliency[:, dead] = 0.0
    if already is not None:
        saliency[already] = -1.0
    return saliency


def _lowest(values, diagonal, dead, already, count: int) -> torch.Tensor:
    """The ``count`` lowest-saliency entries of a block (plus any already pruned) as a bool mask."""
    saliency = _saliency(values, diagonal, dead, already)
    chosen = row_lowest(saliency.reshape(1, -1), count).reshape(saliency.shape)  # as a stable sort, without one
    return chosen if already is None else chosen | already


def _lowest_per_row(values, diagonal, dead, already, count: int) -> torch.Tensor:
    """The ``count`` lowest-saliency entries of each row of a group (plus any already pruned)."""
    chosen = row_lowest(_saliency(values, diagonal, dead, already), count)
    return chosen if already is None else chosen | already


def _write(model: nn.Module, name: str, module: nn.Module, matrix: torch.Tensor, keep: torch.Tensor,
           known: set[str]) -> None:
    """New weights into the layer, its zeros into a mask: ``set_masks`` for the project's layers.

    A ``Conv1D`` that :func:`explorer.layers.prunable_layers` does not list gets the same
    ``torch.nn.utils.prune`` re-parametrisation directly.
    """
    mask = _from_matrix(module, keep)
    with torch.no_grad():
        target = getattr(module, weight_name(module) + "_orig", weight_of(module))
        target.copy_(_from_matrix(module, matrix).to(target))
    if name in known:
        masking.set_masks(model, {name: mask}, regrow="keep")
    elif hasattr(module, "weight_mask"):
        with torch.no_grad():
            module.weight_mask.copy_(mask)
        module.weight = effective_weight(module)
    elif not mask.all():
        prune.custom_from_mask(module, "weight", mask)
