"""Importance scores: how much each weight or channel matters (higher = more important = kept).

A criterion turns a model (and, for data-driven ones, a few calibration batches) into one
score tensor per prunable layer. Two granularities share one registry:

* :func:`weight_scores` — one score per weight, same shape as the layer's weight
  (unstructured pruning);
* :func:`channel_scores` — one score per output channel / neuron (structured pruning).

Prunable layers are every ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``; only their
``weight`` is scored. Calibration data is an iterable of ``(x, y)`` classification
batches; losses are ``cross_entropy``. Scores are computed on a deep copy of the model in
eval mode (deterministic: no dropout, BatchNorm running statistics), on the model's
device, and returned as float32 CPU tensors. The model passed in is never touched. On a
masked model (``torch.nn.utils.prune``) scores describe the effective, masked weights.

Example::

    scores = channel_scores(model, "taylor", calib=loader, max_batches=4)
    scores["features.0"].shape  # (out_channels,)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from explorer.errors import ExplorerError
from explorer.layers import clone_model, prunable_layers

NORMS = ("l1", "l2")
CONDUCTANCE_STEPS = 16
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

Scores = dict[str, torch.Tensor]


@dataclass
class _Request:
    """Everything a criterion may use; built and validated once by the public functions."""

    model: nn.Module
    layer_names: list[str]
    calib: Iterable | None
    seed: int
    input_shape: Sequence[int] | None
    max_batches: int | None
    norm: str = "l1"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class Criterion:
    """A named way to score units; ``weight_fn``/``channel_fn`` do the work."""

    name: str
    description: str
    needs_data: bool
    weight_fn: Callable[[_Request], Scores]
    channel_fn: Callable[[_Request], Scores]


# ---------------------------------------------------------------------------- helpers


def _modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    by_name = dict(model.named_modules())
    return [by_name[name] for name in names]


def _per_channel(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce a weight-shaped tensor to one value per output channel (dim 0)."""
    flat = scores.flatten(1)
    if how == "l2":
        return flat.norm(p=2, dim=1)
    if how == "l1":
        return flat.abs().sum(dim=1)
    return flat.sum(dim=1)


def _broadcast_to_weight(channel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return channel.reshape(shape).expand_as(weight).clone()


def _batches(request: _Request):
    """Yield calibration ``(x, y)`` batches on the model's device, at most ``max_batches``."""
    if request.calib is None:
        raise ExplorerError("This criterion needs calibration data: pass calib=[(x, y), ...] batches.")
    count = 0
    for batch in request.calib:
        if request.max_batches is not None and count >= request.max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ExplorerError("Calibration data must yield (inputs, labels) pairs, e.g. from a DataLoader.")
        inputs, labels = batch
        yield inputs.to(request.device), labels.to(request.device)
        count += 1
    if count == 0:
        raise ExplorerError("The calibration data is empty: give at least one (inputs, labels) batch.")


def _working_copy(request: _Request) -> tuple[nn.Module, list[torch.Tensor]]:
    """Eval-mode deep copy whose prunable weights (and nothing else) require grad."""
    model = clone_model(request.model, fold_masks=True).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weights = [module.weight for module in _modules(model, request.layer_names)]
    for weight in weights:
        weight.requires_grad_(True)
    return model, weights


def _accumulate(request: _Request, per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Scores:
    """Sum ``per_batch(weight, grad)`` over calibration batches; one backward pass per batch."""
    model, weights = _working_copy(request)
    totals: list[torch.Tensor | None] = [None] * len(weights)
    for inputs, labels in _batches(request):
        loss = F.cross_entropy(model(inputs), labels)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for index, (weight, grad) in enumerate(zip(weights, grads)):
            grad = torch.zeros_like(weight) if grad is None else grad
            value = per_batch(weight.detach(), grad)
            totals[index] = value if totals[index] is None else totals[index] + value
    return {name: total for name, total in zip(request.layer_names, totals)}


# ------------------------------------------------------------------------- criteria


def _magnitude_weights(request: _Request) -> Scores:
    modules = _modules(request.model, request.layer_names)
    return {name: module.weight.detach().abs() for name, module in zip(request.layer_names, modules)}


def _magnitude_channels(request: _Request) -> Scores:
    return {name: _per_channel(score, request.norm) for name, score in _magnitude_weights(request).items()}


def _random_scores(request: _Request, per_channel: bool) -> Scores:
    generator = torch.Generator().manual_seed(request.seed)
    scores = {}
    for name, module in zip(request.layer_names, _modules(request.model, request.layer_names)):
        shape = module.weight.shape[:1] if per_channel else module.weight.shape
        scores[name] = torch.rand(shape, generator=generator)
    return scores


def _gradient_weights(request: _Request) -> Scores:
    return _accumulate(request, lambda weight, grad: grad.abs())


def _gradient_channels(request: _Request) -> Scores:
    return {name: _per_channel(score, request.norm) for name, score in _gradient_weights(request).items()}


def _taylor_weights(request: _Request) -> Scores:
    return _accumulate(request, lambda weight, grad: (weight * grad).abs())


def _taylor_channels(request: _Request) -> Scores:
    return _accumulate(request, lambda weight, grad: _per_channel(weight * grad, "sum").abs())


def _snip_weights(request: _Request) -> Scores:
    gradient_sums = _accumulate(request, lambda weight, grad: grad)
    modules = _modules(request.model, request.layer_names)
    return {
        name: (module.weight.detach() * gradient_sums[name]).abs()
        for name, module in zip(request.layer_names, modules)
    }


def _snip_channels(request: _Request) -> Scores:
    return {name: _per_channel(score, "sum") for name, score in _snip_weights(request).items()}


def batchnorm_after(model: nn.Module) -> dict[str, str]:
    """Map each prunable layer to the BatchNorm that directly consumes its output.

    Found by tracing the model with ``torch.fx`` (a BN node whose input is the layer's
    output node); for models that cannot be traced, by module order (a BN registered right
    after the layer with as many features as the layer has output channels).
    """
    modules = dict(model.named_modules())
    layer_names = {name for name, _ in prunable_layers(model)}

    def matches(layer_name: str, bn_name: str) -> bool:
        layer, norm = modules[layer_name], modules[bn_name]
        return isinstance(norm, _BATCHNORM_TYPES) and norm.num_features == layer.weight.shape[0]

    pairs: dict[str, str] = {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any untraceable model: fall back to registration order
        graph = None
    if graph is not None:
        for node in graph.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            source = node.args[0]
            if source.op == "call_module" and source.target in layer_names and node.target in modules:
                if matches(source.target, node.target):
                    pairs[source.target] = node.target
        return pairs
    leaves = [name for name, module in model.named_modules() if not list(module.children())]
    for previous, current in zip(leaves, leaves[1:]):
        if previous in layer_names and matches(previous, current):
            pairs[previous] = current
    return pairs


def _bn_scale_channels(request: _Request) -> Scores:
    """|γ| of the following BatchNorm (network slimming, Liu et al. 2017).

    Layers with no BatchNorm right after them (e.g. the classifier) fall back to their
    filter L1 norm. That fallback is on a different scale from |γ|: mix the two only in
    local scope, or protect the fallback layers in global scope.
    """
    pairs = batchnorm_after(request.model)
    modules = dict(request.model.named_modules())
    scores = {}
    for name in request.layer_names:
        if name in pairs and modules[pairs[name]].weight is not None:
            scores[name] = modules[pairs[name]].weight.detach().abs()
        else:
            scores[name] = _per_channel(modules[name].weight.detach(), "l1")
    return scores


def _bn_scale_weights(request: _Request) -> Scores:
    modules = _modules(request.model, request.layer_names)
    return {
        name: _broadcast_to_weight(channel, module.weight.detach())
        for (name, channel), module in zip(_bn_scale_channels(request).items(), modules)
    }


def _conductance_channels(request: _Request) -> Scores:
    """Mean |layer conductance| of each output channel towards the true label (captum).

    Averaged over calibration examples and over spatial positions (or sequence positions
    for a Linear applied to 3-D input). Costs ``CONDUCTANCE_STEPS`` forward/backward passes
    per batch per layer: keep the calibration set small.
    """
    from captum.attr import LayerConductance

    model = clone_model(request.model).eval()
    modules = _modules(model, request.layer_names)
    sums: list[torch.Tensor | None] = [None] * len(modules)
    examples = 0
    for inputs, labels in _batches(request):
        examples += inputs.shape[0]
        for index, module in enumerate(modules):
            attribution = LayerConductance(model, module).attribute(inputs, target=labels, n_steps=CONDUCTANCE_STEPS)
            channel_dim = attribution.dim() - 1 if isinstance(module, nn.Linear) else 1
            per_example = attribution.detach().abs().movedim(channel_dim, -1)
            per_example = per_example.reshape(inputs.shape[0], -1, per_example.shape[-1]).mean(dim=1)
            batch_sum = per_example.sum(dim=0)
            sums[index] = batch_sum if sums[index] is None else sums[index] + batch_sum
    return {name: total / examples for name, total in zip(request.layer_names, sums)}


def _conductance_weights(request: _Request) -> Scores:
    modules = _modules(request.model, request.layer_names)
    return {
        name: _broadcast_to_weight(channel, module.weight.detach())
        for (name, channel), module in zip(_conductance_channels(request).items(), modules)
    }


def _synflow_input_shape(request: _Request) -> tuple[int, ...]:
    if request.input_shape is not None:
        return tuple(int(size) for size in request.input_shape)
    if request.calib is not None:
        for inputs, _ in _batches(request):
            return tuple(inputs.shape[1:])
    raise ExplorerError("SynFlow is data-free but needs the input shape: pass input_shape=(C, H, W) for one example.")


def _synflow_weights(request: _Request) -> Scores:
    """SynFlow (Tanaka et al. 2020): |w · ∂R/∂w| with R the output sum of a linearised net.

    On a double-precision, eval-mode copy every parameter and buffer is replaced by its
    absolute value and the net is fed one all-ones example: R = sum(output) then measures
    the "synaptic flow" through each weight without any data. Single-shot (not the
    iterative version). Scores are rescaled by a power of two (exact, order-preserving)
    so that they fit in float32.
    """
    shape = _synflow_input_shape(request)
    model = clone_model(request.model, fold_masks=True).double().eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weights = [module.weight for module in _modules(model, request.layer_names)]
    for weight in weights:
        weight.requires_grad_(True)
    ones = torch.ones((1, *shape), dtype=torch.float64, device=request.device)
    try:
        flow = model(ones).sum()
    except RuntimeError as error:
        raise ExplorerError(
            f"SynFlow could not run the model on an all-ones input of shape {shape}: {error}. "
            "Check input_shape (one example, no batch dimension)."
        ) from error
    grads = torch.autograd.grad(flow, weights, allow_unused=True)
    scores = {
        name: torch.zeros_like(weight) if grad is None else (weight * grad).detach().abs()
        for name, weight, grad in zip(request.layer_names, weights, grads)
    }
    largest = max(float(score.max()) for score in scores.values())
    if not math.isfinite(largest):
        raise ExplorerError(
            "SynFlow overflowed even in double precision (the network is too deep or its "
            "weights too large); use another data-free criterion such as magnitude."
        )
    scale = 2.0 ** -math.floor(math.log2(largest)) if largest > 0 else 1.0
    return {name: score * scale for name, score in scores.items()}


def _synflow_channels(request: _Request) -> Scores:
    return {name: _per_channel(score, "sum") for name, score in _synflow_weights(request).items()}


CRITERIA: dict[str, Criterion] = {
    "magnitude": Criterion(
        "magnitude", "|w|; per channel the L1 or L2 norm of the filter", False, _magnitude_weights, _magnitude_channels
    ),
    "random": Criterion(
        "random",
        "seeded uniform noise: the baseline every criterion must beat",
        False,
        lambda request: _random_scores(request, per_channel=False),
        lambda request: _random_scores(request, per_channel=True),
    ),
    "gradient": Criterion(
        "gradient",
        "|∂L/∂w| summed over calibration batches; per channel its filter norm",
        True,
        _gradient_weights,
        _gradient_channels,
    ),
    "taylor": Criterion(
        "taylor",
        "first-order Taylor |w·g| per batch, summed; per channel |Σ_filter w·g| (Molchanov 2019, abs not square)",
        True,
        _taylor_weights,
        _taylor_channels,
    ),
    "bn_scale": Criterion(
        "bn_scale",
        "|γ| of the BatchNorm after the layer (network slimming); filter L1 norm where there is none",
        False,
        _bn_scale_weights,
        _bn_scale_channels,
    ),
    "conductance": Criterion(
        "conductance",
        "captum layer conductance towards the true label, mean |·| per channel",
        True,
        _conductance_weights,
        _conductance_channels,
    ),
    "snip": Criterion(
        "snip",
        "SNIP connection sensitivity |w·∂L/∂w| at the current weights (Lee et al. 2019)",
        True,
        _snip_weights,
        _snip_channels,
    ),
    "synflow": Criterion(
        "synflow",
        "data-free synaptic flow |w·∂R/∂w| on an all-ones input (Tanaka et al. 2020)",
        False,
        _synflow_weights,
        _synflow_channels,
    ),
}


# ----------------------------------------------------------------------- public API


def _request(model, criterion, calib, seed, input_shape, max_batches, norm) -> tuple[Criterion, _Request]:
    if criterion not in CRITERIA:
        raise ExplorerError(f"Unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")
    chosen = CRITERIA[criterion]
    layers = prunable_layers(model)
    if not layers:
        raise ExplorerError("The model has no Conv1d, Conv2d or Linear layer to prune.")
    if chosen.needs_data and calib is None:
        raise ExplorerError(
            f"Criterion {criterion!r} needs calibration data: pass calib=[(inputs, labels), ...] "
            "or choose a data-free criterion (magnitude, random, bn_scale, synflow)."
        )
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ExplorerError(f"max_batches must be a positive integer or None, got {max_batches!r}.")
    if norm not in NORMS:
        raise ExplorerError(f"Unknown norm {norm!r}; choose one of {', '.join(NORMS)}.")
    request = _Request(model, [name for name, _ in layers], calib, seed, input_shape, max_batches, norm)
    return chosen, request


def _finish(scores: Scores, criterion: str) -> Scores:
    finished = {}
    for name, score in scores.items():
        score = score.detach().to("cpu", torch.float32)
        if not torch.isfinite(score).all():
            raise ExplorerError(
                f"Criterion {criterion!r} gave NaN or inf scores for layer {name!r}: the model's "
                "weights or the calibration data contain NaN/inf or the loss diverged; check them "
                "or choose another criterion."
            )
        finished[name] = score
    return finished


def weight_scores(
    model: nn.Module,
    criterion: str,
    calib: Iterable | None = None,
    *,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    max_batches: int | None = None,
) -> Scores:
    """One score per weight: ``{layer name: tensor shaped like layer.weight}``.

    For the channel criteria ``bn_scale`` and ``conductance`` each channel's score is
    broadcast over all the weights of its filter (row, for Linear). ``input_shape`` (one
    example, no batch dimension) is only used by ``synflow``; ``max_batches`` caps how
    many calibration batches the data-driven criteria read.
    """
    chosen, request = _request(model, criterion, calib, seed, input_shape, max_batches, "l1")
    return _finish(chosen.weight_fn(request), criterion)


def channel_scores(
    model: nn.Module,
    criterion: str,
    calib: Iterable | None = None,
    *,
    norm: str = "l1",
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    max_batches: int | None = None,
) -> Scores:
    """One score per output channel / neuron: ``{layer name: tensor of length out_channels}``.

    magnitude and gradient take the ``norm`` ("l1" or "l2") of the filter's |w| or
    accumulated |g|; taylor is Σ_batches |Σ_filter w·g|; snip and synflow sum their weight
    scores over the filter; bn_scale is |γ|; conductance is captum's mean |conductance|.
    """
    chosen, request = _request(model, criterion, calib, seed, input_shape, max_batches, norm)
    return _finish(chosen.channel_fn(request), criterion)
