"""What every method over training time shares: its context (`MethodRun`), its base class, its record.

A method (iterative pruning, gradual pruning, lottery tickets, sparse training ...) is a small
class whose ``run(ctx, params)`` returns the pruned model. It never copies the training loop: it
calls ``ctx.train`` (the shared `explorer.train.train`, with the method's callbacks), ``ctx.prune``
(score, plan and prune a copy with the recipe's structure, criterion and scope) and
``ctx.record`` (a trajectory point). The context keeps the budget, the trajectory, the progress
across phases and the cancel flag, so every method is measured and compared the same way.

A trajectory point is ``{step, epoch, sparsity, train_loss, val_accuracy, lr, regrown, event}``:
cumulative optimiser steps and epochs of the whole method, the fraction of the start model's
prunable weights that are gone (masked off or removed: `layers.prunable_counts`), the epoch's mean training loss, the validation
accuracy, the learning rate, how many pruned weights grew back since the last point (SET, RigL,
soft pruning; 0 elsewhere) and what happened (``epoch``, ``prune``, ``rewind`` ...). Epoch points
also name the task ``metric`` validation reports and its ``val_metric`` (perplexity or fidelity
for a transformer without labels, where ``val_accuracy`` is None); training distils towards the
start model when the task has no labels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from explorer import pipeline
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, prunable_counts, prunable_layers
from explorer.planner import Plan
from explorer.specs import PlanSpec, ScoringSpec
from explorer.train import (Callback, CancelFlag, Progress, TrainConfig, TrainResult, TrainState, metric_for,
                            steps_per_epoch, train)


@dataclass(frozen=True)
class NoParams:
    """A method without settings of its own."""

    def validate(self) -> "NoParams":
        return self


class Method:
    """A way to prune over training time; subclasses set the class attributes and ``run``.

    ``structures`` lists the structures it serves; ``from_scratch`` methods start from freshly
    initialised weights (pruning at init, lottery tickets, sparse training) instead of the
    trained start model; ``Params`` is a frozen dataclass with ``validate()`` holding the
    method's own settings (the keys beside ``name`` in ``method: {name: ..., ...}``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "channel")
    from_scratch: ClassVar[bool] = False
    needs_training: ClassVar[bool] = True  # False: runs with a budget of 0 epochs (prune only)
    Params: ClassVar[type] = NoParams

    def run(self, ctx: "MethodRun", params: Any) -> nn.Module:
        raise ExplorerError(f"Method '{self.name}' has no run step.")


def collapsed_layers(model: nn.Module) -> list[str]:
    """Prunable layers whose effective weight is entirely zero: the network is cut there."""
    return [name for name, module in prunable_layers(model)
            if not bool(torch.count_nonzero(effective_weight(module).detach()))]


@dataclass
class MethodRun:
    """The context a method runs in: start model, data, recipe, budget, trajectory, progress, cancel.

    ``model`` is the dense start model and is never changed. ``epochs`` is the training budget
    the method may spend in total; ``config`` carries the recipe's training hyper-parameters with
    that many epochs. ``on_point`` (if given) sees every trajectory point as it is recorded, for
    a live chart.
    """

    model: nn.Module
    dataset: Dataset
    scoring: ScoringSpec
    plan_spec: PlanSpec
    config: TrainConfig
    seed: int = 0
    progress: Callable[[float, str], None] | None = None
    cancel: CancelFlag | None = None
    on_point: Callable[[dict], None] | None = None
    trajectory: list[dict] = field(default_factory=list)
    steps_done: int = 0
    epochs_done: int = 0
    last_plan: Plan | None = None
    _regrown: int = 0
    _base_total: int = 0
    _base_channels: int | None = None
    _phase_start: int = 0  # the schedule step the current training phase started at (rewinding replays)
    metric: str = "accuracy"  # what validation reports (set from the model and data)

    def __post_init__(self):
        self._base_total = prunable_counts(self.model)[1]
        self.metric = metric_for(self.model, self.dataset)

    # ------------------------------------------------------------------ the budget
    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def target(self) -> float:
        """The final sparsity the recipe asks for."""
        return self.plan_spec.sparsity

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.dataset, self.config)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def epochs_left(self) -> int:
        return max(0, self.epochs - self.epochs_done)

    # ------------------------------------------------------------------ models and pruning
    def fresh_model(self, seed: int | None = None) -> nn.Module:
        """A copy of the start model with freshly initialised weights (every ``reset_parameters``)."""
        model = clone_model(self.model)
        torch.manual_seed(self.seed if seed is None else seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return model.eval()

    def sparsity(self, model: nn.Module) -> float:
        """Fraction of the start model's prunable weights gone from ``model``: masked off or removed (a weight
        its mask keeps is live even at zero, so a regrown connection counts as kept)."""
        return 1.0 - prunable_counts(model)[0] / max(1, self._base_total)

    def prepare(self, model: nn.Module, scoring: ScoringSpec | None = None) -> pipeline.Prepared:
        """Score and rank ``model`` (its current masks count as pruned) with the recipe's scoring."""
        return pipeline.prepare(model, scoring or self.scoring, dataset=self.dataset, seed=self.seed)

    def plan(self, prepared: pipeline.Prepared, sparsity: float) -> Plan:
        """The recipe's plan (scope, protect, overrides, min_keep) at ``sparsity`` of the start model.

        Unstructured: already-masked weights count as pruned, so ``sparsity`` is the total.
        Channel: a model that already lost channels has fewer units, so the fraction asked of it
        is what is still missing from ``sparsity`` of the start model's channels.
        """
        fraction = sparsity
        if prepared.structure == "channel":
            if self._base_channels is None:
                self._base_channels = prepared.ranking.total
            current = prepared.ranking.total
            missing = round(sparsity * self._base_channels) - (self._base_channels - current)
            fraction = min(1.0, max(0.0, missing / max(1, current)))
        self.last_plan = pipeline.preview(prepared, dataclasses.replace(self.plan_spec, sparsity=fraction))
        return self.last_plan

    def prune(self, model: nn.Module, sparsity: float, *, prepared: pipeline.Prepared | None = None,
              scoring: ScoringSpec | None = None) -> nn.Module:
        """A copy of ``model`` pruned to ``sparsity`` (of the start model) by the recipe's structure."""
        prepared = prepared or self.prepare(model, scoring)
        if self._base_channels is None and prepared.structure == "channel" and model is self.model:
            self._base_channels = prepared.ranking.total
        return pipeline.apply(model, prepared, self.plan(prepared, sparsity))

    # ------------------------------------------------------------------ training and the record
    def train(self, model: nn.Module, epochs: int, *, callbacks: tuple[Callback, ...] | list = (),
              config: TrainConfig | None = None, start_step: int = 0) -> TrainResult:
        """Train a copy of ``model`` for ``epochs`` with the shared loop, recording a point per epoch.

        ``config`` defaults to the recipe's training settings with ``epochs`` epochs; with
        ``start_step`` the schedule is replayed from that step (learning-rate rewinding), in which
        case ``config.epochs`` is the length of the schedule being replayed.
        """
        config = config or dataclasses.replace(self.config, epochs=epochs)
        if epochs <= 0 or self.cancelled:
            return TrainResult(model=clone_model(model), device="cpu")
        recorder = _Recorder(self)
        self._phase_start = start_step
        result = train(model, self.dataset, config, progress=self._progress, cancel=self.cancel,
                       callbacks=[*callbacks, recorder], start_step=start_step, teacher=self.model)
        self.steps_done += result.steps
        self.epochs_done += result.epochs_done
        if result.cancelled and recorder.loss_count:  # keep the partial epoch in the record
            self.record(result.model, event="cancelled", train_loss=recorder.loss_sum / recorder.loss_count)
        return result

    def note_regrown(self, count: int) -> None:
        """Count weights that grew back; the next trajectory point reports (and resets) the sum."""
        self._regrown += int(count)

    def record(self, model: nn.Module, *, event: str, train_loss: float | None = None,
               val_accuracy: float | None = None, lr: float | None = None, val_metric: float | None = None) -> dict:
        """Append a trajectory point for ``model`` as it is now."""
        point = {"step": self.steps_done, "epoch": self.epochs_done, "sparsity": self.sparsity(model),
                 "train_loss": train_loss, "val_accuracy": val_accuracy, "metric": self.metric,
                 "val_metric": val_accuracy if val_metric is None and self.metric == "accuracy" else val_metric,
                 "lr": lr, "regrown": self._regrown,
                 "event": event}
        self._regrown = 0
        self.trajectory.append(point)
        if self.on_point is not None:
            self.on_point(point)
        return point

    def report(self, fraction: float, status: str) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, fraction)), status)

    def _progress(self, progress: Progress) -> None:
        if progress.metric is not None:
            return
        done = self.steps_done + (progress.epoch - 1) * progress.steps_per_epoch + progress.step - self._phase_start
        self.report(done / max(1, self.total_steps),
                    f"epoch {self.epochs_done + 1}/{self.epochs}, loss {progress.loss:.3f}")

    def record_step(self, state: TrainState, *, event: str, taken: int | None = None, start_step: int = 0) -> dict:
        """A trajectory point from inside ``ctx.train`` (a callback's mask update, say), for ``state.model``.

        ``taken`` is how many steps of the schedule are done (default ``state.global_step + 1``,
        as in ``on_step_end``; ``state.global_step`` in ``on_step_start``) and ``start_step`` the
        step that ``ctx.train`` call began at, so the point's step and epoch fall between the
        epoch points that ``ctx.train`` records.
        """
        taken = state.global_step + 1 if taken is None else taken
        saved = self.steps_done, self.epochs_done
        self.steps_done += taken - start_step
        self.epochs_done += taken // state.steps_per_epoch - start_step // state.steps_per_epoch
        try:
            return self.record(state.model, event=event, lr=state.lr)
        finally:
            self.steps_done, self.epochs_done = saved


class _Recorder(Callback):
    """Adds one trajectory point per completed epoch, with the epoch's mean loss."""

    def __init__(self, ctx: MethodRun):
        self.ctx = ctx
        self.loss_sum = 0.0
        self.loss_count = 0
        self.steps_since = 0
        self.epochs_since = 0

    def on_step_end(self, state: TrainState) -> None:
        if state.loss is not None and math.isfinite(state.loss):
            self.loss_sum += state.loss
            self.loss_count += 1
        self.steps_since += 1

    def on_epoch_end(self, state: TrainState) -> None:
        self.epochs_since += 1
        ctx = self.ctx
        point = {"step": ctx.steps_done + self.steps_since, "epoch": ctx.epochs_done + self.epochs_since,
                 "sparsity": ctx.sparsity(state.model),
                 "train_loss": self.loss_sum / max(1, self.loss_count), "val_accuracy": state.val_accuracy,
                 "metric": state.metric, "val_metric": state.val_metric,
                 "lr": state.lr, "regrown": ctx._regrown, "event": "epoch"}
        ctx._regrown = 0
        ctx.trajectory.append(point)
        if ctx.on_point is not None:
            ctx.on_point(point)
        self.loss_sum, self.loss_count = 0.0, 0
