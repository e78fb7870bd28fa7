"""Methods that let training choose what to prune: a sparsity penalty, or masks learned as parameters.

`Penalty` adds a term to the loss that drives whole weights, filters or BatchNorm scales
towards zero, then cuts the smallest; `LearnedMask` gives every weight a learned gate or score
and keeps exactly the best ones at the end. Both are driven by the shared training loop
through callbacks (`SparsityPenalty`, `HardConcreteGates`, `MovementScores`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from explorer import masking, planner
from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, mask_of, original_of, prunable_layers, set_mask, weight_of
from explorer.methods.base import Method, MethodRun
from explorer.train import Callback, TrainState

_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PENALTY_KINDS = {"l1": "unstructured", "group_lasso": "channel", "bn_l1": "channel"}  # kind -> structure it serves
DEFAULT_KIND = {"unstructured": "l1", "channel": "group_lasso"}
DEFAULT_STRENGTH = {"l1": 1e-3, "group_lasso": 1e-3, "bn_l1": 1e-2}  # tried with Adam (the default), small models


def _fail(name: str, allowed: str, value) -> ExplorerError:
    return ExplorerError(f"recipe: method.{name} must be {allowed}, got {value!r}.")


def _check_strength(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise _fail("strength", "a number > 0 (or left out for the kind's default)", value)


def _check_open_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise _fail(name, "a fraction strictly between 0 and 1", value)


class _StopAt(Callback):
    """Ends a training run after schedule step ``step`` - 1, so the next run resumes at ``start_step=step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state: TrainState) -> None:
        if state.global_step + 1 >= self.step:
            state.stop = True


def _split(ctx: MethodRun, fraction: float) -> int:
    """The step ending the first phase: ``fraction`` of the budget, leaving at least one step on each side."""
    total = ctx.total_steps
    return min(max(1, round(fraction * total)), max(1, total - 1))


# ---------------------------------------------------------------------------------------- penalty


def _penalised(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The non-negative quantities ``kind`` sums, per layer (differentiable)."""
    if kind == "l1":
        return {name: effective_weight(module).abs() for name, module in prunable_layers(model)}
    if kind == "group_lasso":
        return {name: effective_weight(module).flatten(1).norm(dim=1) for name, module in prunable_layers(model)}
    if kind == "bn_l1":
        scales = {name: module.weight.abs() for name, module in model.named_modules()
                  if isinstance(module, _BATCHNORM_TYPES) and module.weight is not None}
        if not scales:
            raise ExplorerError("Penalty kind 'bn_l1' (network slimming) shrinks BatchNorm scales, and this model "
                                "has no BatchNorm with a scale; use kind group_lasso.")
        return scales
    raise ExplorerError(f"Unknown penalty kind {kind!r}; choose one of {', '.join(PENALTY_KINDS)}.")


def penalty_norms(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """What the penalty of ``kind`` sums, per layer, as CPU tensors: plot them before and after training.

    ``l1``: |w| of every weight of each prunable layer (its effective, masked weight);
    ``group_lasso``: ‖w_f‖₂ of each filter (output channel, Linear row) of each prunable layer;
    ``bn_l1``: |γ| of each BatchNorm scale, keyed by the BatchNorm's name. The penalty is
    ``strength`` times the sum of all of them.
    """
    return {name: values.detach().float().cpu() for name, values in _penalised(model, kind).items()}


class SparsityPenalty(Callback):
    """Adds ``strength · Σ`` of `penalty_norms` to every step's loss (``kind``: l1, group_lasso, bn_l1).

    Its gradient is ``strength · sign(w)`` (l1), ``strength · w_f / ‖w_f‖₂`` (group lasso, 0 for a
    zero filter) or ``strength · sign(γ)`` (bn_l1): a constant pull towards zero that the data
    loss resists only where a unit matters.
    """

    def __init__(self, kind: str, strength: float):
        self.kind, self.strength = kind, strength

    def penalty(self, state: TrainState) -> torch.Tensor:
        return self.strength * sum(values.sum() for values in _penalised(state.model, self.kind).values())


@dataclass(frozen=True)
class PenaltyParams:
    """``kind``: l1, group_lasso or bn_l1 (left out: l1 for unstructured, group_lasso for channel);
    ``strength``: λ (left out: 1e-3 for l1 and group_lasso, 1e-2 for bn_l1); ``penalty_fraction``:
    the share of the budget trained with the penalty before the cut."""

    kind: str | None = None
    strength: float | None = None
    penalty_fraction: float = 0.5

    def validate(self) -> "PenaltyParams":
        if self.kind is not None and self.kind not in PENALTY_KINDS:
            raise _fail("kind", f"one of {', '.join(PENALTY_KINDS)} (or left out)", self.kind)
        _check_strength(self.strength)
        _check_open_fraction("penalty_fraction", self.penalty_fraction)
        return self


class Penalty(Method):
    """Train with a sparsity-inducing penalty, cut the units it shrank, then fine-tune without it.

    For the first ``penalty_fraction`` of the budget the loss is ``L + λ · R(w)``:
    ``l1`` R = Σ|w| over every prunable weight (unstructured); ``group_lasso`` R = Σ_f ‖w_f‖₂
    over the filters (Wen et al. 2016, structured sparsity learning), which drives whole filters
    to zero together (channel); ``bn_l1`` R = Σ|γ| over the BatchNorm scales (Liu et al. 2017,
    network slimming), which silences channels through their scale (channel; needs BatchNorm).
    Then the recipe's plan cuts to the target with the recipe's criterion (pair l1 and
    group_lasso with magnitude, bn_l1 with bn_scale, so the cut removes what the penalty shrank)
    and the rest of the budget fine-tunes the pruned network, continuing the learning-rate
    schedule. It helps at high sparsity, where the units cut were already near zero and the cut
    costs little accuracy.
    """

    name = "penalty"
    summary = "train with an L1 / group-lasso / BatchNorm-L1 penalty, cut to the target, fine-tune"
    Params = PenaltyParams

    def run(self, ctx: MethodRun, params: PenaltyParams) -> nn.Module:
        structure = ctx.scoring.structure
        kind = params.kind or DEFAULT_KIND[structure]
        if PENALTY_KINDS[kind] != structure:
            others = [name for name, serves in PENALTY_KINDS.items() if serves == structure]
            raise ExplorerError(f"Penalty kind '{kind}' prepares {PENALTY_KINDS[kind]} pruning, not {structure}; "
                                f"use kind {' or '.join(others)}, or structure {PENALTY_KINDS[kind]}.")
        penalty_norms(ctx.model, kind)  # refuses a model the penalty cannot act on before any training
        strength = params.strength if params.strength is not None else DEFAULT_STRENGTH[kind]
        cut = _split(ctx, params.penalty_fraction)
        trained = ctx.train(ctx.model, ctx.epochs, callbacks=[SparsityPenalty(kind, strength), _StopAt(cut)]).model
        if ctx.cancelled:
            return trained
        pruned = ctx.prune(trained, ctx.target)
        ctx.record(pruned, event="prune")
        if cut < ctx.total_steps and not ctx.cancelled:
            pruned = ctx.train(pruned, ctx.epochs, start_step=cut).model
        return pruned


# ----------------------------------------------------------------------------------- learned masks

# Hard concrete (Louizos et al. 2018): temperature β, stretch interval (γ, ζ).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
LOG_ALPHA_INIT = 3.0  # gates start open (expected gate ≈ 1): the start model is trained
DEFAULT_L0_STRENGTH = 1e-3  # λ per gate, against the batch-mean loss
LEARN_FRACTION = 0.75  # share of the budget spent learning masks; the rest fine-tunes the final mask


def _hard_concrete_sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """z = min(1, max(0, sigmoid((log u − log(1 − u) + log α) / β) · (ζ − γ) + γ)), u ~ U(0, 1)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def hard_concrete_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic gate used at test time: min(1, max(0, sigmoid(log α) · (ζ − γ) + γ))."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def expected_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) per gate: sigmoid(log α − β · log(−γ / ζ)), the expected L0 norm's terms."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class _MaskLearner(Callback):
    """Shared plumbing: one auxiliary tensor per prunable layer, living here, not in the model.

    The model carries ``torch.nn.utils.prune`` masks; before each step ``weight_mask`` is set to a
    tensor computed from the auxiliary one (so autograd reaches it through the pruning hook's
    ``weight_orig * weight_mask``), and after the step the callback updates the auxiliary tensors
    itself and leaves a plain, detached mask in place for validation and copies. The shared
    optimiser never sees them, so the recipe's optimiser and weight decay stay the model's.
    """

    def __init__(self, ctx: MethodRun, start_masks: dict[str, torch.Tensor], learn_steps: int):
        self.ctx, self.start_masks, self.learn_steps = ctx, start_masks, learn_steps
        self.aux: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}

    def _install(self, model: nn.Module, init: float) -> None:
        self.modules = dict(prunable_layers(model))
        self.aux = {name: torch.full_like(original_of(module), init, requires_grad=True)
                    for name, module in self.modules.items()}

    def top_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Keep the best units by the auxiliary scores under the recipe's plan (scope, protect,
        overrides, min_keep); units the start model had pruned stay pruned. Exact counts; a plan
        that empties a layer is refused, as `explorer.pipeline.apply` refuses it."""
        scores = {name: values.detach().float().cpu() for name, values in self.aux.items()}
        ranking = planner.prepare(scores, kept=masking.kept_units(self.start_masks, scores))
        spec = self.ctx.plan_spec
        plan = planner.plan(ranking, sparsity, spec.scope, overrides=spec.overrides, protect=spec.protect,
                            min_keep=spec.min_keep)
        if plan.collapsed:
            raise ExplorerError(f"The learned scores empty {', '.join(plan.collapsed[:3])} at sparsity "
                                f"{sparsity:.1%}: the network would be cut in two. Lower the sparsity, switch to "
                                "local scope, protect the layer or set a min_keep guard.")
        self.ctx.last_plan = plan
        return masking.masks(ranking, plan)


class HardConcreteGates(_MaskLearner):
    """L0 gates: w' = w ⊙ z, z a stretched hard-concrete sample of a learned log α per weight.

    The penalty ``λ · max(0, Σ P(z ≠ 0) − (1 − target) · N)`` (the expected L0 norm beyond the
    target's count of weights) closes gates until about the target density is open; the data
    loss keeps the useful ones open. The log α have their own Adam (``gate_lr``).
    """

    def __init__(self, ctx: MethodRun, start_masks, learn_steps: int, strength: float, lr: float):
        super().__init__(ctx, start_masks, learn_steps)
        self.strength, self.lr = strength, lr
        self.optimizer: torch.optim.Optimizer | None = None

    def on_step_start(self, state: TrainState) -> None:
        if not self.aux:
            self._install(state.model, LOG_ALPHA_INIT)
            self.optimizer = torch.optim.Adam(list(self.aux.values()), lr=self.lr)
        self.optimizer.zero_grad(set_to_none=True)
        for name, module in self.modules.items():
            set_mask(module, _hard_concrete_sample(self.aux[name]) * self._start(name, module))

    def penalty(self, state: TrainState) -> torch.Tensor:
        kept = sum(expected_open(log_alpha).sum() for log_alpha in self.aux.values())
        allowed = (1 - self.ctx.target) * sum(log_alpha.numel() for log_alpha in self.aux.values())
        return self.strength * torch.relu(kept - allowed)

    def on_step_end(self, state: TrainState) -> None:
        self.optimizer.step()
        with torch.no_grad():
            for name, module in self.modules.items():
                set_mask(module, hard_concrete_gate(self.aux[name]).detach() * self._start(name, module))

    def _start(self, name: str, module: nn.Module) -> torch.Tensor:
        mask = self.start_masks.get(name)
        return torch.ones((), device=original_of(module).device) if mask is None else mask.to(original_of(module))

    def finish(self, model: nn.Module) -> None:
        """Fold the test-time gates into the weights (where open) and keep exactly the target by log α."""
        final = self.top_masks(self.ctx.target)
        with torch.no_grad():
            for name, module in prunable_layers(model):
                gate = hard_concrete_gate(self.aux[name].detach()).to(original_of(module))
                original_of(module).mul_(torch.where(gate > 0, gate, torch.ones_like(gate)))
                set_mask(module, torch.ones_like(original_of(module)))
        masking.set_masks(model, final, regrow="keep")


class MovementScores(_MaskLearner):
    """Movement pruning: S accumulates −w ⊙ ∂L/∂w', the mask keeps the top (1 − s_t) by S.

    The mask is applied straight through (forward: the top-k mask; backward: ∂L/∂S = ∂L/∂mask =
    w ⊙ ∂L/∂w'), and each step S ← S − ∂L/∂S, Sanh et al.'s S = −Σ_t w ⊙ ∂L/∂w' with the
    learning rate left out (only the order of S matters). Weights moving away from zero gain
    score, weights moving towards it lose it. The sparsity s_t follows a cubic ramp from 0 to the
    target over the learning steps (Zhu & Gupta 2017), s_t = target · (1 − (1 − t / T)³).
    """

    def __init__(self, ctx: MethodRun, start_masks: dict[str, torch.Tensor], learn_steps: int):
        super().__init__(ctx, start_masks, learn_steps)
        self.hard: dict[str, torch.Tensor] = {}  # this step's top-k mask

    def sparsity_at(self, step: int) -> float:
        return self.ctx.target * (1 - (1 - min(1.0, step / max(1, self.learn_steps))) ** 3)

    def on_step_start(self, state: TrainState) -> None:
        if not self.aux:
            self._install(state.model, 0.0)
        self.hard = self.top_masks(self.sparsity_at(state.global_step))
        for name, module in self.modules.items():
            kept = self.hard[name].to(original_of(module).device)
            self.ctx.note_regrown(int((kept & ~mask_of(module).bool()).sum()))
            score = self.aux[name]
            set_mask(module, kept.to(original_of(module).dtype) + (score - score.detach()))  # exactly 0 or 1

    def on_step_end(self, state: TrainState) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                score = self.aux[name]
                if score.grad is not None:
                    score -= score.grad
                    score.grad = None
                set_mask(module, self.hard[name].to(original_of(module)))

    def finish(self, model: nn.Module) -> None:
        """Keep exactly the target by S (the ramp's last mask, up to the last step's update)."""
        regrown = masking.set_masks(model, self.top_masks(self.ctx.target), regrow="keep")
        self.ctx.note_regrown(sum(int(units.sum()) for units in regrown.values()))


@dataclass(frozen=True)
class LearnedMaskParams:
    """``kind``: movement or hard_concrete. For hard_concrete only: ``strength``, λ of the L0 penalty
    (default 1e-3 per gate), and ``gate_lr``, the gates' Adam learning rate (default
    min(1, 10 / learning steps): a gate can close from fully open in about half the learning phase)."""

    kind: str = "movement"
    strength: float | None = None
    gate_lr: float | None = None

    def validate(self) -> "LearnedMaskParams":
        if self.kind not in ("movement", "hard_concrete"):
            raise _fail("kind", "one of movement, hard_concrete", self.kind)
        _check_strength(self.strength)
        if self.gate_lr is not None and (isinstance(self.gate_lr, bool) or not isinstance(self.gate_lr, (int, float))
                                         or not math.isfinite(self.gate_lr) or self.gate_lr <= 0):
            raise _fail("gate_lr", "a positive learning rate (or left out)", self.gate_lr)
        if self.kind == "movement" and (self.strength is not None or self.gate_lr is not None):
            raise ExplorerError("recipe: method.strength and method.gate_lr tune the L0 gates of kind hard_concrete; "
                                "movement learns its scores without them: leave them out.")
        return self


class LearnedMask(Method):
    """Masks learned through auxiliary parameters during training; the target is kept exactly at the end.

    ``movement`` (Sanh et al. 2020): a score per weight accumulates −w · ∂L/∂w, so weights the
    loss pushes away from zero are kept, whatever their size now; the kept fraction falls on a
    cubic ramp to the target, through a straight-through top-k mask. ``hard_concrete`` (Louizos
    et al. 2018): a learned log α per weight opens a stochastic gate z in [0, 1]; a penalty on
    the expected number of open gates beyond the target closes the ones the loss does not need.
    Masks are learned for the first 3/4 of the budget; then exactly the target is kept by score
    (movement: S; hard_concrete: log α, its open gates folded into the weights) and the rest of
    the budget fine-tunes that fixed mask. It helps when a weight's size is a poor guide, as in
    fine-tuning a trained network for a new task: movement keeps what the new task needs.
    """

    name = "learned_mask"
    summary = "learn masks (movement scores or hard-concrete L0 gates) while training; keep exactly the target"
    structures = ("unstructured",)
    Params = LearnedMaskParams

    def run(self, ctx: MethodRun, params: LearnedMaskParams) -> nn.Module:
        start_masks = masking.current_masks(ctx.model)
        model = masking.apply_masks(clone_model(ctx.model, fold_masks=True), {
            name: start_masks.get(name, torch.ones_like(weight_of(module), dtype=torch.bool))
            for name, module in prunable_layers(ctx.model)})
        learn_steps = _split(ctx, LEARN_FRACTION)
        if params.kind == "hard_concrete":
            learner = HardConcreteGates(ctx, start_masks, learn_steps,
                                        params.strength if params.strength is not None else DEFAULT_L0_STRENGTH,
                                        params.gate_lr if params.gate_lr is not None else min(1.0, 10 / learn_steps))
        else:
            learner = MovementScores(ctx, start_masks, learn_steps)
        learned = ctx.train(model, ctx.epochs, callbacks=[learner, _StopAt(learn_steps)]).model
        if ctx.cancelled or not learner.aux:
            return learned
        learner.finish(learned)
        ctx.record(learned, event="prune")
        if learn_steps < ctx.total_steps and not ctx.cancelled:
            learned = ctx.train(learned, ctx.epochs, start_step=learn_steps).model
        return learned
