"""Importance scores: how much each weight or channel matters (higher = more important = kept).

A criterion turns a model (and, for data-driven ones, a few calibration batches) into one
score tensor per prunable layer. Two granularities share one registry:

* :func:`weight_scores` — one score per weight, same shape as the layer's weight
  (unstructured pruning);
* :func:`channel_scores` — one score per output channel / neuron (structured pruning).

Prunable layers are every ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``; only their
``weight`` is scored. Calibration data is an iterable of ``(x, y)`` batches. The gradient
criteria (gradient, taylor, snip) differentiate the task's calibration loss
(`explorer.tasks.calibration_loss`): cross-entropy for a classifier with labels, the
next-token loss for a causal LM, and for unlabelled data or embeddings the sampled-label
Fisher loss (targets drawn, with ``seed``, from the model's own outputs). Scores are computed on a deep copy of the model in
eval mode (deterministic: no dropout, BatchNorm running statistics), on the model's
device, and returned as float32 CPU tensors. The model passed in is never touched. On a
masked model (``torch.nn.utils.prune``) scores describe the effective, masked weights.

Both accept ``progress(fraction, text)``, called with a non-decreasing fraction in [0, 1]
as the work proceeds (once per calibration batch, or per chunk of conductance steps) and
with 1.0 at the end; a UI hands it to its progress bar.

Example::

    scores = channel_scores(model, "taylor", calib=loader, max_batches=4)
    scores["features.0"].shape  # (out_channels,)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explorer import tasks
from explorer.errors import ExplorerError
from explorer.layers import clone_model, prunable_layers, weight_name, weight_of

NORMS = ("l1", "l2")
CONDUCTANCE_STEPS = 16
CONDUCTANCE_FLOATS = 2**25  # layer outputs kept per conductance forward pass (128 MiB in float32)
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Bounded or saturating activations: their gradient vanishes on SynFlow's large positive signal.
_SATURATING_ACTIVATIONS = (
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU,
    nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Softsign,
)

Scores = dict[str, torch.Tensor]
Progress = Callable[[float, str], None]


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
    progress: Progress | None = None

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


def _report(request: _Request, batches_done: float, text: str) -> None:
    """Tell ``request.progress`` how many calibration batches are done (fractions count).

    The fraction is ``batches_done / expected``; when the number of batches cannot be known
    (a generator and no ``max_batches``) it is ``1 - 1 / (1 + batches_done)``, which still
    grows towards 1.
    """
    if request.progress is None:
        return
    try:
        expected = len(request.calib)
        if request.max_batches is not None:
            expected = min(expected, request.max_batches)
    except TypeError:
        expected = request.max_batches
    fraction = batches_done / expected if expected else 1 - 1 / (1 + batches_done)
    request.progress(min(1.0, fraction), text)


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
    weights = [weight_of(module) for module in _modules(model, request.layer_names)]
    for weight in weights:
        weight.requires_grad_(True)
    return model, weights


def _accumulate(request: _Request, per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Scores:
    """Sum ``per_batch(weight, grad)`` over calibration batches; one backward pass per batch."""
    model, weights = _working_copy(request)
    totals: list[torch.Tensor | None] = [None] * len(weights)
    generator = torch.Generator().manual_seed(request.seed)
    for batch_index, (inputs, labels) in enumerate(_batches(request)):
        loss = tasks.calibration_loss(model, inputs, labels, generator)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for index, (weight, grad) in enumerate(zip(weights, grads)):
            grad = torch.zeros_like(weight) if grad is None else grad
            value = per_batch(weight.detach(), grad)
            totals[index] = value if totals[index] is None else totals[index] + value
        _report(request, batch_index + 1, f"calibration batch {batch_index + 1}")
    return {name: total for name, total in zip(request.layer_names, totals)}


# ------------------------------------------------------------------------- criteria


def _magnitude_weights(request: _Request) -> Scores:
    modules = _modules(request.model, request.layer_names)
    return {name: weight_of(module).detach().abs() for name, module in zip(request.layer_names, modules)}


def _magnitude_channels(request: _Request) -> Scores:
    return {name: _per_channel(score, request.norm) for name, score in _magnitude_weights(request).items()}


def _random_scores(request: _Request, per_channel: bool) -> Scores:
    generator = torch.Generator().manual_seed(request.seed)
    scores = {}
    for name, module in zip(request.layer_names, _modules(request.model, request.layer_names)):
        shape = weight_of(module).shape[:1] if per_channel else weight_of(module).shape
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
        name: (weight_of(module).detach() * gradient_sums[name]).abs()
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
        return isinstance(norm, _BATCHNORM_TYPES) and norm.num_features == weight_of(layer).shape[0]

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
            scores[name] = _per_channel(weight_of(modules[name]).detach(), "l1")
    return scores


def _bn_scale_weights(request: _Request) -> Scores:
    modules = _modules(request.model, request.layer_names)
    return {
        name: _broadcast_to_weight(channel, weight_of(module).detach())
        for (name, channel), module in zip(_bn_scale_channels(request).items(), modules)
    }


def _conductance_alphas(steps: int = CONDUCTANCE_STEPS) -> list[float]:
    """captum's default path points: ``steps + 1`` Gauss–Legendre nodes mapped to (0, 1)."""
    return (0.5 * (1 + np.polynomial.legendre.leggauss(steps + 1)[0])).tolist()


def _capture_outputs(modules: list[nn.Module], parents: dict[int, nn.Module] | None = None) -> dict[int, torch.Tensor]:
    """Hook every module so each forward stores its output (by module position).

    The hook hands the rest of the network a clone, as captum does, so an in-place op
    after the layer (``ReLU(inplace=True)``) cannot overwrite the stored output. An attention's
    ``out_proj`` is never called on its own: its output is the attention's first output, hooked
    on the attention (``parents``: module position -> attention).
    """
    outputs: dict[int, torch.Tensor] = {}

    def hook_for(index: int, first_of_tuple: bool):
        def hook(module, inputs, output):
            if index in outputs:
                raise ExplorerError("A prunable layer runs more than once per forward pass (shared weights); "
                                    "conductance needs one output per layer: choose another criterion.")
            if first_of_tuple:
                outputs[index] = output[0]
                return (output[0].clone(), *output[1:])
            outputs[index] = output
            return output.clone()
        return hook

    parents = parents or {}
    for index, module in enumerate(modules):
        parents.get(index, module).register_forward_hook(hook_for(index, index in parents))
    return outputs


def _path_conductance(model, outputs, inputs, labels, alphas, steps_per_pass, on_pass) -> dict[int, torch.Tensor]:
    """Every hooked layer's conductance Σ_k ∂y/∂h(α_k) · (h(α_{k+1}) − h(α_k)), keyed by layer position.

    ``steps_per_pass`` path points go through the model stacked in one batch; one autograd
    call gives the target logit's gradient for every layer. A layer's last point (h, ∂y/∂h)
    is carried into the next pass; ``on_pass`` hears the fraction of the path done. A layer
    the forward pass never runs is left out.
    """
    count = len(inputs)
    conductance: dict[int, torch.Tensor] = {}
    previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for first in range(0, len(alphas), steps_per_pass):
        chunk = alphas[first:first + steps_per_pass]
        outputs.clear()
        logits = model(torch.cat([inputs * alpha for alpha in chunk]).requires_grad_())
        if logits.dim() != 2:
            raise ExplorerError(f"Conductance needs (batch, classes) logits; the model returns shape {tuple(logits.shape)}.")
        target = logits.gather(1, labels.repeat(len(chunk)).unsqueeze(1)).sum()
        indices = sorted(outputs)
        grads = torch.autograd.grad(target, [outputs[i] for i in indices], allow_unused=True)
        for index, grad in zip(indices, grads):
            layer = outputs[index].detach().unflatten(0, (len(chunk), count))
            grad = torch.zeros_like(layer) if grad is None else grad.unflatten(0, (len(chunk), count))
            step_sum = (grad[:-1] * (layer[1:] - layer[:-1])).sum(dim=0)
            if index in previous:
                last_layer, last_grad = previous[index]
                step_sum += last_grad * (layer[0] - last_layer)
            conductance[index] = conductance[index] + step_sum if index in conductance else step_sum
            previous[index] = (layer[-1], grad[-1])
        on_pass((first + len(chunk)) / len(alphas))
    outputs.clear()
    return conductance


def _channel_means(conductance: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(examples, channels): mean |conductance| over positions; channels are last for a Linear."""
    channel_dim = conductance.dim() - 1 if isinstance(module, nn.Linear) else 1
    per_example = conductance.abs().movedim(channel_dim, -1)
    return per_example.reshape(per_example.shape[0], -1, per_example.shape[-1]).mean(dim=1)


def _conductance_channels(request: _Request) -> Scores:
    """Mean |layer conductance| of each output channel towards the true label (Dhamdhere et al. 2019).

    Conductance splits the integrated gradient of the target logit from a zero input to x
    over hidden units: Σ_k ∂y/∂h(α_k) · (h(α_{k+1}) − h(α_k)) along the straight path, with
    captum's ``LayerConductance`` default quadrature (``CONDUCTANCE_STEPS + 1`` Gauss–Legendre
    points). All layers share each forward/backward pass, so the cost is about
    ``CONDUCTANCE_STEPS + 1`` passes per batch, not that many per layer; path points are
    chunked so at most ``CONDUCTANCE_FLOATS`` layer outputs are held at once. Averaged over
    examples and positions (sequence positions for a Linear on 3-D input). An attention's input
    projection returns no tensor of its own to integrate over: it is left out (kept dense).
    """
    model = clone_model(request.model, fold_masks=True).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    names = [name for name, module in zip(request.layer_names, _modules(model, request.layer_names))
             if weight_name(module) == "weight"]
    modules = _modules(model, names)
    outputs = _capture_outputs(modules, _attention_parents(model, names))
    alphas = _conductance_alphas()
    sums = [torch.zeros(weight_of(module).shape[0], device=request.device) for module in modules]
    examples = 0
    for batch_index, (inputs, labels) in enumerate(_batches(request)):
        if not inputs.is_floating_point():
            raise ExplorerError("Conductance integrates along a path of scaled inputs, and token ids cannot be "
                                "scaled: choose taylor, snip, gradient, wanda or magnitude for this model.")
        if batch_index == 0:
            with torch.no_grad():
                model(inputs[:1])
            rows_per_pass = max(1, CONDUCTANCE_FLOATS // max(1, sum(out.numel() for out in outputs.values())))
        group = min(len(inputs), rows_per_pass)  # examples per pass, then as many path points as fit
        starts = range(0, len(inputs), group)
        for part, start in enumerate(starts):
            conductance = _path_conductance(
                model, outputs, inputs[start:start + group], labels[start:start + group], alphas,
                max(1, rows_per_pass // group),
                lambda done: _report(request, batch_index + (part + done) / len(starts),
                                     f"conductance: calibration batch {batch_index + 1}"),
            )
            for index, layer_conductance in conductance.items():
                sums[index] += _channel_means(layer_conductance, modules[index]).sum(dim=0)
        examples += len(inputs)
    return {name: total / examples for name, total in zip(names, sums)}


def _attention_parents(model: nn.Module, names: list[str]) -> dict[int, nn.Module]:
    """Positions in ``names`` of attention output projections, with their attention module."""
    parents = {}
    for index, name in enumerate(names):
        parent = model.get_submodule(name.rpartition(".")[0]) if name.endswith(".out_proj") else None
        if isinstance(parent, nn.MultiheadAttention):
            parents[index] = parent
    return parents


def _conductance_weights(request: _Request) -> Scores:
    modules = dict(request.model.named_modules())
    return {name: _broadcast_to_weight(channel, weight_of(modules[name]).detach())
            for name, channel in _conductance_channels(request).items()}


def _synflow_input_shape(request: _Request) -> tuple[int, ...]:
    if request.input_shape is not None:
        return tuple(int(size) for size in request.input_shape)
    if request.calib is not None:
        for inputs, _ in _batches(request):
            return tuple(inputs.shape[1:])
    raise ExplorerError("SynFlow is data-free but needs the input shape: pass input_shape=(C, H, W) for one example.")


class _PositiveAffine(nn.Module):
    """An eval-mode BatchNorm as SynFlow sees it: x · |γ/σ| + |β − γμ/σ|, never negative.

    This is the BN folded into an affine map (as it is folded into its conv when deployed),
    then linearised like any layer: |scale|, |bias|. Taking |running_mean| and subtracting it,
    as plain ``abs()`` of the BN buffers would, can drive the positive signal below zero,
    where the next ReLU kills it; a conv's score is the same as in the BN-folded net.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        scale = 1 / torch.sqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach()
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias.detach()
        self.register_buffer("scale", scale.abs())
        self.register_buffer("shift", shift.abs())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


def _linearise(model: nn.Module) -> nn.Module:
    """SynFlow's positive, positively homogeneous copy of ``model`` (changed in place).

    Eval BatchNorms become :class:`_PositiveAffine`; bounded or saturating activations
    (ReLU6, Hardtanh, sigmoid, tanh, SiLU, GELU...) become ReLU, which on the all-positive
    signal is the identity; then every parameter and buffer takes its absolute value. Only
    modules can be swapped: a functional call in ``forward`` (``F.relu6(x)``) stays as it is.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, _BATCHNORM_TYPES) and module.running_var is not None:
            replacement = _PositiveAffine(module)
        elif isinstance(module, _SATURATING_ACTIVATIONS):
            replacement = nn.ReLU()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    return model


def _synflow_weights(request: _Request) -> Scores:
    """SynFlow (Tanaka et al. 2020): |w · ∂R/∂w| with R the output sum of a linearised net.

    On a double-precision, eval-mode copy made positive (:func:`_linearise`) the net is fed
    one all-ones example: R = sum(output) then measures the "synaptic flow" through each
    weight without any data. SynFlow's conservation argument assumes a positively
    homogeneous net (ReLU-like: f(a·x) = a·f(x) for a > 0); a ReLU6 saturates at 6 on the
    large positive signal and zeroes every gradient before it, so such activations are
    swapped for ReLU. Single-shot (not the iterative version). Scores are rescaled by a
    power of two (exact, order-preserving) so that they fit in float32.
    """
    shape = _synflow_input_shape(request)
    model = _linearise(clone_model(request.model, fold_masks=True).double().eval())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weights = [weight_of(module) for module in _modules(model, request.layer_names)]
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


def _wanda_weights(request: _Request) -> Scores:
    from explorer import llm

    return llm.wanda_scores(request.model, request.calib, layers=request.layer_names, progress=request.progress)


def _wanda_channels(request: _Request) -> Scores:
    """Per output channel the sum of |W|·‖X‖ over its row (the structured reading of Wanda)."""
    from explorer import llm

    raw = llm.wanda_raw(request.model, request.calib, layers=request.layer_names, progress=request.progress)
    return {name: _per_channel(score, "l1") for name, score in raw.items()}


def _sparsegpt_weights(request: _Request) -> Scores:
    from explorer import llm

    hessians = llm.hessians(request.model, request.calib, layers=request.layer_names, progress=request.progress)
    return llm.sparsegpt_scores(request.model, hessians)


def _sparsegpt_channels(request: _Request) -> Scores:
    raise ExplorerError("sparsegpt prunes single weights and rebuilds the rest: use --structure unstructured or nm.")


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
        "layer conductance towards the true label (captum's quadrature, all layers per pass), mean |·| per channel",
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
    "wanda": Criterion(
        "wanda",
        "|w|·‖x‖₂ of each input feature over calibration activations, compared within each output row (Sun et al. 2023)",
        True,
        _wanda_weights,
        _wanda_channels,
    ),
    "sparsegpt": Criterion(
        "sparsegpt",
        "layer-wise reconstruction: OBS saliency, then the kept weights are updated on Apply (Frantar & Alistarh 2023)",
        True,
        _sparsegpt_weights,
        _sparsegpt_channels,
    ),
}


# ----------------------------------------------------------------------- public API


def _request(model, criterion, calib, seed, input_shape, max_batches, norm, progress) -> tuple[Criterion, _Request]:
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
    if progress is not None and not callable(progress):
        raise ExplorerError("progress must be a function taking (fraction, text), or None.")
    request = _Request(model, [name for name, _ in layers], calib, seed, input_shape, max_batches, norm, progress)
    return chosen, request


def _run(score_fn: Callable[[_Request], Scores], request: _Request, criterion: str) -> Scores:
    """Run one criterion between a 0.0 and a 1.0 progress report; check and convert its scores."""
    if request.progress is not None:
        request.progress(0.0, f"{criterion}: scoring")
    scores = score_fn(request)
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
    if request.progress is not None:
        request.progress(1.0, f"{criterion}: done")
    return finished


def weight_scores(
    model: nn.Module,
    criterion: str,
    calib: Iterable | None = None,
    *,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    max_batches: int | None = None,
    progress: Progress | None = None,
    layers: Sequence[str] | None = None,
) -> Scores:
    """One score per weight: ``{layer name: tensor shaped like layer.weight}``.

    For the channel criteria ``bn_scale`` and ``conductance`` each channel's score is
    broadcast over all the weights of its filter (row, for Linear). ``input_shape`` (one
    example, no batch dimension) is only used by ``synflow``; ``max_batches`` caps how
    many calibration batches the data-driven criteria read; ``progress(fraction, text)``
    hears how far the work is (see the module docstring); ``layers`` scores only those prunable
    layers (default: all), so layers meant to stay dense cost nothing.
    """
    chosen, request = _request(model, criterion, calib, seed, input_shape, max_batches, "l1", progress)
    if layers is not None:
        wanted = set(layers)
        request.layer_names = [name for name in request.layer_names if name in wanted]
    return _run(chosen.weight_fn, request, criterion)


def channel_scores(
    model: nn.Module,
    criterion: str,
    calib: Iterable | None = None,
    *,
    norm: str = "l1",
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> Scores:
    """One score per output channel / neuron: ``{layer name: tensor of length out_channels}``.

    magnitude and gradient take the ``norm`` ("l1" or "l2") of the filter's |w| or
    accumulated |g|; taylor is Σ_batches |Σ_filter w·g|; snip and synflow sum their weight
    scores over the filter; bn_scale is |γ|; conductance is the mean |layer conductance|.
    Arguments as in :func:`weight_scores`.
    """
    chosen, request = _request(model, criterion, calib, seed, input_shape, max_batches, norm, progress)
    return _run(chosen.channel_fn, request, criterion)
