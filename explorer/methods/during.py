"""Pruning while the network trains: gradual (and soft) pruning, and sparse training (SET, RigL).

All three change the masks of the model being trained from a `Callback` of the shared training
loop (`explorer.masking.set_masks` in place, so the optimizer keeps its parameters) and record an
``update`` point in the trajectory at each change. `Gradual` raises the sparsity on a cubic
schedule from a trained start; `SET` and `RigL` start from fresh weights at the target sparsity
and keep it exactly, moving a fraction of the connections every Δt steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from explorer import masking
from explorer.errors import ExplorerError
from explorer.layers import clone_model, fold_masks, mask_of, original_of, prunable_layers, set_mask, weight_name, weight_of
from explorer.methods.base import Method, MethodRun
from explorer.train import Callback, TrainState

DENSITIES = ("erk", "uniform")


def _fail(name: str, allowed: str, value) -> ExplorerError:
    return ExplorerError(f"recipe: method.{name} must be {allowed}, got {value!r}.")


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_delta_t(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _fail("delta_t", "a whole number of steps >= 1 (or left out for the default)", value)


def _check_end_fraction(value) -> None:
    if not _number(value) or not 0 < value <= 1:
        raise _fail("end_fraction", "a fraction of the budget in (0, 1]", value)


def _phase_end(ctx: MethodRun, end_fraction: float) -> int:
    """The step (of the whole budget) at which a method stops changing masks."""
    return max(1, round(end_fraction * ctx.total_steps))


def _check_dense_budget(kept: float, sizes: Mapping[str, int], dense: Iterable[str], sparsity: float) -> None:
    """The layers kept dense must fit in the weights the target sparsity leaves."""
    dense = sorted(set(dense))
    if kept < sum(sizes[name] for name in dense):
        raise ExplorerError(f"The layers kept dense ({', '.join(dense)}) hold more weights than sparsity {sparsity} "
                            "leaves; lower plan.sparsity or protect fewer layers.")


def _collapse_error(layers: Sequence[str]) -> ExplorerError:
    return ExplorerError(f"Pruning empties {', '.join(layers[:3])}: the network would be cut in two. Lower the "
                         "sparsity, switch to local scope, protect the layer or set a min_keep guard.")


def _straight_through(module: nn.Module, inputs) -> None:
    """Forward pre-hook run after the pruning hook: the forward still sees ``weight_orig * weight_mask``,
    but the gradient reaches every entry of ``weight_orig``, pruned ones included (mask in the forward only)."""
    orig = original_of(module)
    if orig is not None:
        setattr(module, weight_name(module), orig + (weight_of(module) - orig).detach())


def _unmasked_view(model: nn.Module) -> nn.Module:
    """A CPU copy whose weights are ``weight_orig`` everywhere: what a soft-pruned model would be unmasked."""
    view = clone_model(model).cpu()
    with torch.no_grad():
        for _, module in prunable_layers(view):
            if mask_of(module) is not None:
                mask_of(module).fill_(1)
    return fold_masks(view)


# ---------------------------------------------------------------------------------------------- gradual


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, updates: int, delta_t: int) -> float:
    """Zhu & Gupta's schedule: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * Δt)) ** 3``.

    Fast at first, when many weights are redundant, and slowing towards ``s_f`` as fewer remain.
    ``step`` is clamped to the schedule's span ``[t0, t0 + n Δt]``.

    >>> round(cubic_sparsity(50, initial=0.0, final=0.8, start=0, updates=10, delta_t=10), 6)
    0.7
    """
    progress = min(1.0, max(0.0, (step - start) / (updates * delta_t)))
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class GradualParams:
    """``initial_sparsity`` s_i; ``start_epoch`` t0 in epochs; the pruning phase ends at ``end_fraction``
    of the budget (default 0.5: the last cuts need the second half to recover; bench/RESULTS_methods.md);
    ``delta_t`` steps between mask updates (default: about 10 updates in the phase); ``regrow`` true makes
    it soft pruning (pruned weights keep training and can come back)."""

    initial_sparsity: float = 0.0
    start_epoch: int = 0
    end_fraction: float = 0.5
    delta_t: int | None = None
    regrow: bool = False

    def validate(self) -> "GradualParams":
        if not _number(self.initial_sparsity) or not 0 <= self.initial_sparsity < 1:
            raise _fail("initial_sparsity", "a sparsity in [0, 1)", self.initial_sparsity)
        if isinstance(self.start_epoch, bool) or not isinstance(self.start_epoch, int) or self.start_epoch < 0:
            raise _fail("start_epoch", "a whole number of epochs >= 0", self.start_epoch)
        _check_end_fraction(self.end_fraction)
        _check_delta_t(self.delta_t)
        if not isinstance(self.regrow, bool):
            raise _fail("regrow", "true or false", self.regrow)
        return self


class _GradualUpdates(Callback):
    """Sets the masks of the model being trained to ``s_t`` at each scheduled step (``taken`` steps done)."""

    def __init__(self, ctx: MethodRun, params: GradualParams, start: int, updates: int, delta_t: int):
        self.ctx, self.params = ctx, params
        self.start, self.updates, self.delta_t = start, updates, delta_t
        self.schedule = {start + k * delta_t for k in range(updates + 1)}
        self.last = start + updates * delta_t
        self.hooks: list = []

    def on_step_start(self, state: TrainState) -> None:
        if state.global_step == 0 and 0 in self.schedule:
            self._update(state, 0)

    def on_step_end(self, state: TrainState) -> None:
        if state.global_step + 1 in self.schedule:
            self._update(state, state.global_step + 1)

    def _update(self, state: TrainState, taken: int) -> None:
        ctx, model, soft = self.ctx, state.model, self.params.regrow
        sparsity = cubic_sparsity(taken, initial=self.params.initial_sparsity, final=ctx.target, start=self.start,
                                  updates=self.updates, delta_t=self.delta_t)
        prepared = ctx.prepare(_unmasked_view(model) if soft else clone_model(model).cpu())
        plan = ctx.plan(prepared, sparsity)
        if plan.collapsed:
            raise _collapse_error(plan.collapsed)
        regrown = masking.set_masks(model, masking.masks(prepared.ranking, plan), regrow="keep")
        ctx.note_regrown(sum(int(units.sum()) for units in regrown.values()))
        self.release()
        if soft and taken < self.last:  # after the last update the masks are fixed: ordinary fine-tuning
            self.hooks = [module.register_forward_pre_hook(_straight_through)
                          for _, module in prunable_layers(model) if mask_of(module) is not None]
        ctx.record_step(state, event="update", taken=taken)

    def release(self) -> None:
        """Take the straight-through hooks off the model (a returned model carries none)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class Gradual(Method):
    """Automated gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune"); soft with ``regrow``.

    From step t0 the sparsity rises every Δt steps along ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))³``
    for t = t0, t0 + Δt, ..., t0 + nΔt, where s_f is the recipe's target and n Δt fits in the pruning
    phase (up to ``end_fraction`` of the budget). Each update scores the live model with the recipe's
    criterion and masks the lowest-ranked units (pruned ones stay pruned), so the network keeps
    training while it loses weights fast at first and slowly near the end; the rest of the budget
    fine-tunes with the masks fixed. With ``regrow: true`` it is soft pruning (He et al. 2018, soft
    filter pruning, here per weight): the mask acts in the forward pass only, pruned weights keep
    their values and receive the full gradient (straight-through), and every update re-ranks all
    weights, so a pruned weight that grew important comes back (counted in ``regrown``).
    """

    name = "gradual"
    summary = "raise the sparsity on a cubic schedule while training (soft pruning with regrow)"
    structures = ("unstructured",)
    Params = GradualParams

    def run(self, ctx: MethodRun, params: GradualParams) -> nn.Module:
        if params.initial_sparsity > ctx.target:
            raise _fail("initial_sparsity", f"at most the target sparsity {ctx.target}", params.initial_sparsity)
        start, end = params.start_epoch * ctx.steps_per_epoch, _phase_end(ctx, params.end_fraction)
        if start >= end:
            raise ExplorerError(f"recipe: method.start_epoch {params.start_epoch} leaves no pruning phase: it ends "
                                f"at end_fraction {params.end_fraction} of {ctx.epochs} epochs; start earlier or "
                                "end later.")
        delta_t = params.delta_t or max(1, round((end - start) / 10))
        if delta_t > end - start:
            raise _fail("delta_t", f"at most the pruning phase, {end - start} steps (epochs {params.start_epoch} to "
                        f"{params.end_fraction} of {ctx.epochs})", delta_t)
        updates = _GradualUpdates(ctx, params, start, (end - start) // delta_t, delta_t)
        try:
            return ctx.train(ctx.model, ctx.epochs, callbacks=[updates]).model
        finally:
            updates.release()


# ---------------------------------------------------------------------------------------------- sparse training


Shapes = Mapping[str, Sequence[int]]


def erk_densities(shapes: Shapes, sparsity: float, dense: Iterable[str] = ()) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities (Evci et al. 2020, after Mocanu et al.'s Erdős–Rényi).

    ``density_l = ε · (Σ dims_l) / (Π dims_l)``: thin layers (few weights per input and output)
    stay denser. ε makes the kept weights total ``(1 - sparsity) · N``; a layer whose density
    would pass 1 is kept dense (as are the ``dense`` names) and ε is solved again for the rest.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    full = set(dense)
    kept = (1.0 - sparsity) * sum(sizes.values())
    _check_dense_budget(kept, sizes, full, sparsity)
    epsilon = 0.0
    while True:  # capping a layer frees less than it held, so the budget stays >= 0
        sparse = [name for name in sizes if name not in full]
        budget = kept - sum(sizes[name] for name in full)
        if not sparse:
            break
        epsilon = budget / sum(raw[name] * sizes[name] for name in sparse)
        over = [name for name in sparse if epsilon * raw[name] > 1]
        if not over:
            break
        full.update(over)
    return {name: 1.0 if name in full else epsilon * raw[name] for name in sizes}


def uniform_densities(shapes: Shapes, sparsity: float, dense: Iterable[str] = ()) -> dict[str, float]:
    """The same density in every layer but the ``dense`` ones, so that the total is ``1 - sparsity``."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    full = set(dense)
    kept = (1.0 - sparsity) * sum(sizes.values())
    _check_dense_budget(kept, sizes, full, sparsity)
    budget = kept - sum(sizes[name] for name in full)
    rest = sum(size for name, size in sizes.items() if name not in full)
    density = min(1.0, budget / rest) if rest else 1.0
    return {name: 1.0 if name in full else density for name in sizes}


def kept_counts(sizes: Mapping[str, int], densities: Mapping[str, float], kept_total: int) -> dict[str, int]:
    """Whole numbers of kept weights per layer, near ``density · size``, that add up to ``kept_total``.

    Each layer gets ``floor(density · size)``; the weights still missing go one each to the layers
    with the largest remainders (largest-remainder rounding), never past a layer's size.
    """
    exact = {name: densities[name] * size for name, size in sizes.items()}
    counts = {name: min(size, math.floor(exact[name])) for name, size in sizes.items()}
    order = sorted(sizes, key=lambda name: counts[name] - exact[name])
    kept_total = min(kept_total, sum(sizes.values()))
    while sum(counts.values()) < kept_total:
        room = [name for name in order if counts[name] < sizes[name]]
        for name in room[:kept_total - sum(counts.values())]:
            counts[name] += 1
    return counts


@dataclass(frozen=True)
class SparseTrainingParams:
    """``delta_t`` steps between mask updates (default: one epoch, or less so a short budget still gets
    about 10 updates); ``zeta`` the fraction of each layer's connections moved per update; ``density``
    the per-layer densities (``erk`` or ``uniform``); updates stop after ``end_fraction`` of the budget."""

    delta_t: int | None = None
    zeta: float = 0.3
    density: str = "erk"
    end_fraction: float = 0.75

    def validate(self) -> "SparseTrainingParams":
        _check_delta_t(self.delta_t)
        if not _number(self.zeta) or not 0 < self.zeta < 1:
            raise _fail("zeta", "a fraction in (0, 1)", self.zeta)
        if self.density not in DENSITIES:
            raise _fail("density", f"one of {', '.join(DENSITIES)}", self.density)
        _check_end_fraction(self.end_fraction)
        return self


def initial_masks(model: nn.Module, sparsity: float, density: str, *, dense: Iterable[str] = (),
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random masks with exactly ``round(sparsity · N)`` of the ``N`` prunable weights off, spread over the
    layers by ``density`` (`erk_densities` or `uniform_densities`); ``dense`` layers keep every weight."""
    shapes = {name: tuple(weight_of(module).shape) for name, module in prunable_layers(model)}
    dense = list(dense)
    unknown = [name for name in dense if name not in shapes]
    if unknown:
        raise ExplorerError(f"recipe: plan.protect names {', '.join(unknown)}, which this model does not have; its "
                            f"prunable layers: {', '.join(shapes)}.")
    densities = (erk_densities if density == "erk" else uniform_densities)(shapes, sparsity, dense)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    counts = kept_counts(sizes, densities, total - round(sparsity * total))
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise ExplorerError(f"Sparsity {sparsity} with {density} densities leaves {', '.join(empty)} no weights; "
                            "lower plan.sparsity or use the other density.")
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, shape in shapes.items():
        keep = torch.zeros(sizes[name], dtype=torch.bool)
        keep[torch.randperm(sizes[name], generator=generator)[:counts[name]]] = True
        result[name] = keep.reshape(shape)
    return result


def _reset_optimizer_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, units: torch.Tensor) -> None:
    """New connections start without momentum: zero their entries in every per-weight optimizer buffer."""
    for buffer in optimizer.state.get(parameter, {}).values():
        if isinstance(buffer, torch.Tensor) and buffer.shape == parameter.shape:
            buffer[units] = 0


class _Evolve(Callback):
    """Every Δt steps, in each masked layer: drop the ζ_t smallest active weights, grow as many new ones.

    ``grow`` is "random" (SET) or "gradient" (RigL: the largest dense-gradient magnitudes, from the
    backward pass of the step just taken, through a hook on each layer's effective weight). The
    masks change before the next step's forward pass and the update's trajectory point is
    recorded after that step, once the new connections (which start at zero) have had an optimizer
    step, so its sparsity counts connections rather than fresh zeros.
    """

    def __init__(self, ctx: MethodRun, params: SparseTrainingParams, grow: str, delta_t: int, end: int):
        self.ctx, self.params, self.grow = ctx, params, grow
        self.delta_t, self.end = delta_t, end
        self.generator = torch.Generator().manual_seed(ctx.seed + 1)
        self.gradients: dict[str, torch.Tensor] = {}
        self.hooks: list = []
        self.updated = False

    def is_update(self, taken: int) -> bool:
        """Masks change after ``taken`` steps: every Δt, up to ``T_end``, never after the last step."""
        return taken > 0 and taken % self.delta_t == 0 and taken <= self.end and taken < self.ctx.total_steps

    def zeta_at(self, taken: int) -> float:
        """ζ for SET; RigL's cosine decay ``ζ/2 · (1 + cos(π t / T_end))``."""
        if self.grow == "random":
            return self.params.zeta
        return self.params.zeta / 2 * (1 + math.cos(math.pi * taken / self.end))

    def on_step_start(self, state: TrainState) -> None:
        if self.is_update(state.global_step):
            self._update(state, state.global_step)
        if self.grow == "gradient" and self.is_update(state.global_step + 1):
            for name, module in prunable_layers(state.model):
                if mask_of(module) is not None:
                    self.hooks.append(module.register_forward_pre_hook(self._capture(name)))

    def _capture(self, name: str):
        def hook(module: nn.Module, inputs) -> None:
            if torch.is_grad_enabled() and weight_of(module).requires_grad:
                weight_of(module).register_hook(lambda grad: self.gradients.__setitem__(name, grad.detach().clone()))
        return hook

    def on_step_end(self, state: TrainState) -> None:
        self.release()
        if self.updated:
            self.ctx.record_step(state, event="update")
            self.updated = False

    def _update(self, state: TrainState, taken: int) -> None:
        zeta = self.zeta_at(taken)
        with torch.no_grad():
            layer_masks = {name: self._move(name, module, zeta) for name, module in prunable_layers(state.model)
                           if mask_of(module) is not None}
        regrown = masking.set_masks(state.model, layer_masks, regrow="zero")
        modules = dict(prunable_layers(state.model))
        for name, units in regrown.items():
            _reset_optimizer_state(state.optimizer, original_of(modules[name]), units)
        self.ctx.note_regrown(sum(int(units.sum()) for units in regrown.values()))
        self.gradients = {}
        self.updated = True

    def _move(self, name: str, module: nn.Module, zeta: float) -> torch.Tensor:
        mask = mask_of(module).bool().flatten().cpu()
        active = int(mask.sum())
        count = min(round(zeta * active), mask.numel() - active)
        if count == 0:
            return mask.reshape(mask_of(module).shape)
        magnitude = original_of(module).detach().abs().flatten().cpu().masked_fill(~mask, math.inf)
        mask[torch.topk(magnitude, count, largest=False).indices] = False
        if self.grow == "random":
            candidates = torch.nonzero(~mask).flatten()
            chosen = candidates[torch.randperm(len(candidates), generator=self.generator)[:count]]
        else:
            gradient = self.gradients.get(name, torch.zeros(mask.shape))  # zero: the layer had no gradient
            gradient = gradient.abs().flatten().cpu().masked_fill(mask, -math.inf)
            chosen = torch.topk(gradient, count).indices
        mask[chosen] = True
        return mask.reshape(mask_of(module).shape)

    def release(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class _SparseTraining(Method):
    """Shared by SET and RigL: fresh weights, a random sparse mask at the target, masks moved while training."""

    structures = ("unstructured",)
    from_scratch = True
    Params = SparseTrainingParams
    grow = "random"

    def run(self, ctx: MethodRun, params: SparseTrainingParams) -> nn.Module:
        if ctx.plan_spec.overrides:
            raise ExplorerError(f"Method '{self.name}' sets per-layer densities with method.density; remove "
                                "plan.overrides (plan.protect keeps a layer dense).")
        end = _phase_end(ctx, params.end_fraction)
        delta_t = params.delta_t or max(1, min(ctx.steps_per_epoch, round(end / 10)))
        if delta_t > end:
            raise _fail("delta_t", f"at most the updating phase, {end} steps ({params.end_fraction} of "
                        f"{ctx.epochs} epochs)", delta_t)
        model = ctx.fresh_model()
        masking.set_masks(model, initial_masks(model, ctx.target, params.density, dense=ctx.plan_spec.protect,
                                               seed=ctx.seed))
        ctx.record(model, event="prune")
        evolve = _Evolve(ctx, params, self.grow, delta_t, end)
        try:
            return ctx.train(model, ctx.epochs, callbacks=[evolve]).model
        finally:
            evolve.release()


class SET(_SparseTraining):
    """Sparse Evolutionary Training (Mocanu et al. 2018): a sparse network that rewires itself at random.

    Training starts from fresh weights under a random mask at the target sparsity, spread over the
    layers by ``density`` (``erk``: Erdős–Rényi-Kernel, density ∝ (Σ dims)/(Π dims), see
    `erk_densities`; ``uniform``). Every Δt steps each layer drops the fraction ζ of its active
    weights with the smallest magnitude and grows as many new ones at random among the inactive
    (starting at zero, without optimizer momentum), so the sparsity stays exactly the target while
    the topology evolves; after ``end_fraction`` of the budget the mask is fixed. Δt defaults to one
    epoch (SET's own rhythm), shortened so that a short budget still gets about 10 updates. The
    recipe's criterion and scope play no part; ``plan.protect`` keeps layers dense. The trajectory
    counts the mask, so it reads the target: a new weight is live from the moment it grows, even on
    an input that is always zero, where it never moves from zero.
    """

    name = "set"
    summary = "sparse from scratch; every Δt steps drop the smallest weights and regrow as many at random"


class RigL(_SparseTraining):
    """Rigging the Lottery (Evci et al. 2020): sparse training that regrows where the gradient is largest.

    As `SET`, but new connections go where the dense gradient magnitude ``|∂L/∂W|`` is largest:
    the gradient of each layer's effective weight on the batch of the step just before the update,
    read from that step's own backward pass (a hook, no extra forward), which is dense although the
    weight is sparse; the drop uses the magnitudes after that step.
    The fraction moved decays on a cosine, ``ζ_t = ζ/2 · (1 + cos(π t / T_end))``, so the topology
    settles before updates stop at ``T_end`` (``end_fraction`` of the budget).
    """

    name = "rigl"
    summary = "sparse from scratch; every Δt steps drop the smallest weights, regrow where the gradient is largest"
    grow = "gradient"
