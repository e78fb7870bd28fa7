"""Training and evaluation: baselines, fine-tunes after pruning, and methods that act while training.

`train` works on a *copy* of the model it is given and returns it, so a cached base model is
never changed. It reports progress through a callback (epoch, step, loss, metric) and checks a
cancellation flag every step: a cancelled run keeps the partially trained copy. Masks from
``torch.nn.utils.prune`` stay enforced during training (pruned weights stay zero).

Methods that act *during* training (gradual pruning, SET / RigL, L1 or group-lasso penalties,
lottery-ticket snapshots) never copy this loop: they subclass `Callback`, which `train` calls at
fixed points of every step. The learning rate is a pure function of the step (`lr_at`), so a
run can start at step k of a schedule (``train(..., start_step=k)``) and get exactly the rates
the original run had from step k on, as learning-rate rewinding needs.
Determinism: the seed fixes initial shuffling and dropout; CPU runs repeat bit-for-bit.

Any task trains (``TrainConfig.loss``, `explorer.tasks.loss_for`): a classifier on labels with
cross-entropy, a causal LM with the next-token loss on its text, and a model without labels
(unlabelled text, embeddings) by distillation to the dense model, which stays frozen in eval mode
(KL on temperature-softened logits, or 1 - cosine on embeddings). Validation reports the task's
metric: accuracy, perplexity, or fidelity to the dense model (top-1 agreement, or cosine).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from explorer import jobs, limits, tasks
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.layers import choose_device, clone_model, model_device

OPTIMIZERS = ("adam", "adamw", "sgd")
ANNEALS = ("cos", "linear")


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after every step and every epoch (``metric`` is set at epoch ends).

    ``epoch`` and ``step`` (1-based, within the epoch) are positions in the whole schedule, also for
    a run started part-way (``start_step``). ``metric`` is the validation value of the task metric
    named by ``metric_name`` (accuracy, perplexity, top1 or cosine).
    """

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    metric: float | None = None
    metric_name: str | None = None

    @property
    def global_step(self) -> int:
        """Steps of the schedule done so far, this one included."""
        return (self.epoch - 1) * self.steps_per_epoch + self.step

    @property
    def fraction(self) -> float:
        total = max(1, self.epochs * self.steps_per_epoch)
        return min(1.0, self.global_step / total)


def _fail(name: str, allowed: str, value) -> ExplorerError:
    return ExplorerError(f"Training setting '{name}' must be {allowed}, got {value!r}.")


def _check_int(name: str, value, minimum: int, maximum: int) -> None:
    """A whole number in [minimum, maximum]; the maximum (`explorer.limits`) refuses a typo before training starts."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _fail(name, f"a whole number from {minimum:,} to {maximum:,}", value)


def _parses_as_device(name: str) -> bool:
    try:
        return torch.device(name).type in ("cpu", "cuda", "mps")
    except (RuntimeError, TypeError):
        return False


def _check_number(name: str, value, allowed: str, accept: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not accept(value):
        raise _fail(name, allowed, value)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise _fail(name, "one of " + ", ".join(choices), value)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; plain data, so it can key a cache and a recipe.

    ``lr`` is the base learning rate (the peak of ``one_cycle``) and ``schedule`` how it changes
    with the step (see `LR_SCHEDULES`). ``step_epochs`` and ``gamma`` shape ``step``;
    ``warmup_fraction``, ``anneal``, ``div_factor`` and ``final_div_factor`` shape ``one_cycle``
    and mean what torch's ``OneCycleLR`` calls pct_start, anneal_strategy, div_factor and
    final_div_factor. ``loss`` is what training minimises (`explorer.tasks.LOSSES`): ``auto`` picks
    it by task, ``distill`` forces distillation to the dense model at ``temperature``.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    seed: int = 0
    amp: bool = False
    device: str = "auto"
    step_epochs: int = 10
    gamma: float = 0.1
    warmup_fraction: float = 0.3
    anneal: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    loss: str = "auto"
    temperature: float = 1.0

    def validate(self) -> "TrainConfig":
        """Check every field; the error names the field and what it accepts."""
        _check_int("epochs", self.epochs, 0, limits.MAX_EPOCHS)
        _check_int("batch_size", self.batch_size, 1, limits.MAX_BATCH)
        _check_int("step_epochs", self.step_epochs, 1, limits.MAX_EPOCHS)
        _check_int("seed", self.seed, 0, limits.MAX_SEED)
        _check_number("lr", self.lr, "a positive learning rate", lambda v: v > 0)
        _check_number("weight_decay", self.weight_decay, "a number >= 0", lambda v: v >= 0)
        _check_number("momentum", self.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _check_number("gamma", self.gamma, "a factor in (0, 1]", lambda v: 0 < v <= 1)
        _check_number("warmup_fraction", self.warmup_fraction, "a fraction in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("div_factor", self.div_factor, "a number >= 1", lambda v: v >= 1)
        _check_number("final_div_factor", self.final_div_factor, "a number >= 1", lambda v: v >= 1)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, tuple(LR_SCHEDULES))
        _check_choice("anneal", self.anneal, ANNEALS)
        _check_choice("loss", self.loss, tasks.LOSSES)
        _check_number("temperature", self.temperature, "a positive temperature", lambda v: v > 0)
        if not isinstance(self.amp, bool):
            raise _fail("amp", "true or false", self.amp)
        if not isinstance(self.device, str) or (self.device != "auto" and not _parses_as_device(self.device)):
            raise _fail("device", "a device name such as auto, cpu or cuda", self.device)
        return self

    def to_dict(self) -> dict:
        """The fields as a dict; ``loss`` and ``temperature`` only when not at their defaults, so the
        dict of a config from before they existed (a baseline's cache key) is unchanged."""
        values = asdict(self)
        for name, default in (("loss", "auto"), ("temperature", 1.0)):
            if values[name] == default:
                del values[name]
        return values


def _constant(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """``lr`` at every step."""
    return config.lr


def _step(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """``lr * gamma ** (epoch // step_epochs)``: a drop by ``gamma`` every ``step_epochs`` epochs
    (the classic ResNet schedule; torch's ``StepLR`` stepped once per epoch)."""
    epoch = step // steps_per_epoch
    return config.lr * config.gamma ** (epoch // config.step_epochs)


def _cosine(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """``lr * (1 + cos(pi * t / T)) / 2`` over the run's T steps: a smooth decay towards 0
    (Loshchilov & Hutter, SGDR, 2017, without restarts; torch's ``CosineAnnealingLR(T_max=T)``)."""
    total = config.epochs * steps_per_epoch
    return config.lr * (1 + math.cos(math.pi * step / total)) / 2


def _anneal(kind: str, start: float, end: float, pct: float) -> float:
    if kind == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _one_cycle(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Warm up from ``lr / div_factor`` to ``lr`` over the first ``warmup_fraction`` of the run,
    then anneal to ``lr / (div_factor * final_div_factor)``, both along ``anneal`` (cos or linear)
    (Smith & Topin, super-convergence, 2019; torch's ``OneCycleLR`` with the same phase
    boundaries, except that momentum is not cycled)."""
    total = config.epochs * steps_per_epoch
    start, peak = config.lr / config.div_factor, config.lr
    warmup_end = float(config.warmup_fraction * total) - 1
    if step <= warmup_end:
        return _anneal(config.anneal, start, peak, step / warmup_end if warmup_end > 0 else 1.0)
    end = start / config.final_div_factor
    return _anneal(config.anneal, peak, end, (step - warmup_end) / (total - 1 - warmup_end))


# name -> lr(config, step, steps_per_epoch); each entry's docstring states its formula.
LR_SCHEDULES: dict[str, Callable[[TrainConfig, int, int], float]] = {
    "constant": _constant, "step": _step, "cosine": _cosine, "one_cycle": _one_cycle,
}


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based, counted from the start of the run).

    A pure function of the step, with no scheduler state: replaying a schedule from step k, as
    learning-rate rewinding does (Renda et al., 2020), gives exactly the original rates. The run
    has ``config.epochs * steps_per_epoch`` steps (see `steps_per_epoch`).

    >>> lr_at(TrainConfig(epochs=2, lr=0.1, schedule="cosine"), step=10, steps_per_epoch=10)
    0.05
    """
    total = config.epochs * steps_per_epoch
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total:
        raise ExplorerError(f"Step {step!r} is outside the schedule: {config.epochs} epochs of {steps_per_epoch} "
                            f"steps make {max(total, 0)} steps, numbered from 0.")
    return LR_SCHEDULES[config.validate().schedule](config, step, steps_per_epoch)


def steps_per_epoch(dataset: Dataset, config: TrainConfig) -> int:
    """Optimiser steps in one epoch: the training split in batches of ``config.batch_size``."""
    return max(1, math.ceil(len(dataset.y_train) / config.batch_size))


@dataclass
class TrainState:
    """What a `Callback` sees: the live model and optimiser, where the run stands, the current batch.

    ``epoch`` and ``step`` (within the epoch) are 1-based; ``global_step`` is the 0-based index of
    the step being taken in the whole schedule (so a run started at step k sees k, k+1, ...), and
    ``lr`` its learning rate. ``loss`` is the batch's task loss (``loss_kind``: cross_entropy,
    next_token or distill) without penalties, set after the optimiser step (None before). At epoch
    ends ``val_metric`` holds the validation value of ``metric`` (accuracy, perplexity, top1 or
    cosine) and ``val_accuracy`` the same value when the metric is accuracy (None otherwise).
    ``teacher`` is the frozen dense model that ``distill`` learns from (None for the other losses).
    Set ``stop`` to end training.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    steps_per_epoch: int
    total_steps: int
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    lr: float = 0.0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    loss: float | None = None
    val_accuracy: float | None = None
    stop: bool = False
    loss_kind: str = "cross_entropy"
    teacher: nn.Module | None = None
    metric: str = "accuracy"
    val_metric: float | None = None


class Callback:
    """A hook into `train` for methods that act during training; override only what you need.

    Every step, in this order: ``on_step_start`` (before the forward pass: e.g. regrow or
    resample masks), ``penalty`` (a scalar tensor added to the loss before ``backward``: e.g.
    ``lam * sum|w|`` for L1, ``lam * sum_g ||w_g||_2`` for group lasso; None adds nothing), the
    optimiser step, then ``on_step_end`` (e.g. re-apply or update masks, snapshot weights for a
    lottery ticket). ``on_epoch_end`` follows the validation of every completed epoch. Several
    callbacks run in list order at each point. Setting ``state.stop`` ends training after the
    current step (or epoch), keeping the model as it is.
    """

    def on_step_start(self, state: TrainState) -> None:
        """Before the forward pass of a step."""

    def penalty(self, state: TrainState) -> torch.Tensor | None:
        """A scalar added to the loss of this step before backward, or None."""
        return None

    def on_step_end(self, state: TrainState) -> None:
        """After the optimiser step."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After a completed epoch has been validated (``state.val_metric``, ``state.val_accuracy``)."""


@dataclass
class TrainResult:
    """A trained copy of the model plus what happened while training it.

    ``steps`` counts the steps this run took; ``epochs_done`` the epochs whose last step it took.
    ``cancelled``: the cancel flag stopped it; ``stopped``: a callback did.
    """

    model: nn.Module
    # one row per epoch: epoch, loss, loss_kind, metric (its name), val_metric, val_accuracy (None
    # unless the metric is accuracy), partial
    history: list[dict] = field(default_factory=list)
    cancelled: bool = False
    stopped: bool = False
    epochs_done: int = 0
    steps: int = 0
    seconds: float = 0.0
    device: str = "cpu"


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, split: str = "test", *, batch_size: int = 256,
             device: str | torch.device | None = None) -> dict:
    """Accuracy (fraction correct) and mean cross-entropy of ``model`` on one split.

    Runs in eval mode on a copy placed on ``device`` (default: where the model lives), so the
    caller's model keeps its mode and device.
    """
    target = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    moved = model if model_device(model) == target else clone_model(model).to(target)
    moved.eval()
    correct, loss_sum, count = 0, 0.0, 0
    try:
        for x, y in dataset.batches(split, batch_size):
            x, y = x.to(target), y.to(target)
            logits = moved(x)
            if logits.ndim != 2 or logits.shape[1] < dataset.num_classes:
                raise ExplorerError(f"The model outputs shape {tuple(logits.shape)}; a classifier for "
                                    f"{dataset.num_classes} classes should output (batch, {dataset.num_classes}).")
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    except RuntimeError as exc:
        raise ExplorerError(f"The model cannot run on '{dataset.name}' inputs of shape {dataset.input_shape}: "
                            f"{str(exc).splitlines()[0]}. Pick a dataset that matches the model.") from exc
    finally:
        if moved is model:
            model.train(was_training)
    if count == 0:
        raise ExplorerError(f"The {split} split of '{dataset.name}' is empty.")
    loss = loss_sum / count
    if not math.isfinite(loss):
        raise ExplorerError("The model produces NaN or infinite outputs; its weights may be corrupt.")
    return {"accuracy": correct / count, "loss": loss, "samples": count}


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.momentum > 0)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _task_loss(state: TrainState) -> torch.Tensor:
    """The batch's loss of kind ``state.loss_kind``; distillation runs the frozen teacher without gradients."""
    if state.loss_kind == "cross_entropy":
        return F.cross_entropy(state.model(state.x), state.y)
    teacher_output = None
    if state.loss_kind == "distill":
        with torch.no_grad():
            teacher_output = state.teacher(state.x)
    return tasks.batch_loss(state.loss_kind, state.model(state.x), state.x, state.y, teacher_output=teacher_output,
                            pad_id=getattr(state.model, "pad_id", None),
                            embedding=tasks.model_task(state.model) == "embedding",
                            temperature=state.config.temperature)


def _take_step(state: TrainState, callbacks: Sequence[Callback], scaler: torch.amp.GradScaler,
               use_amp: bool) -> float:
    """One optimiser step on ``state.x, state.y`` with the callbacks around it; returns the task loss."""
    state.lr, state.loss = lr_at(state.config, state.global_step, state.steps_per_epoch), None
    for group in state.optimizer.param_groups:
        group["lr"] = state.lr
    for callback in callbacks:
        callback.on_step_start(state)
    state.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=state.x.device.type, dtype=torch.float16, enabled=use_amp):
        loss = _task_loss(state)
    penalties = [term for term in (callback.penalty(state) for callback in callbacks) if term is not None]
    objective = loss + sum(penalties) if penalties else loss
    if not torch.isfinite(objective):
        raise ExplorerError(f"Training diverged (loss is {objective.item()}) at epoch {state.epoch}, step {state.step}. "
                            f"Lower the learning rate{' or the penalty strength' if penalties else ''}.")
    scaler.scale(objective).backward()
    scaler.step(state.optimizer)
    scaler.update()
    state.loss = loss.item()
    for callback in callbacks:
        callback.on_step_end(state)
    return state.loss


def train(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None, *,
          progress: Callable[[Progress], None] | None = None, cancel: CancelFlag | None = None,
          callbacks: Sequence[Callback] = (), start_step: int = 0, teacher: nn.Module | None = None) -> TrainResult:
    """Train a copy of ``model`` on the training split; return it with its history.

    The loss follows the task (``config.loss``, see the module docstring). Distillation and the
    fidelity metric compare with ``teacher``, the dense model (a frozen copy is used; default: a
    copy of ``model`` as given, right when training starts from the dense model, so pass the
    dense model when fine-tuning a pruned copy).

    ``progress`` is called after every step and after every epoch's validation; ``cancel.is_set()``
    is checked before every step and stops training early, keeping what was learned. ``callbacks``
    let methods act during training (see `Callback`). ``start_step`` begins at that step of the
    schedule, with the learning rates, epoch numbers and batch order the full run has from there
    (learning-rate rewinding). Mixed precision (``amp``) is used only on CUDA.
    """
    config = (config or TrainConfig()).validate()
    per_epoch = steps_per_epoch(dataset, config)
    total_steps = per_epoch * config.epochs
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= total_steps:
        raise ExplorerError(f"start_step must be a step of the schedule, 0 to {total_steps} "
                            f"({config.epochs} epochs x {per_epoch} steps), got {start_step!r}.")
    device = choose_device(config.device)
    torch.manual_seed(config.seed)
    trained = clone_model(model).to(device)
    state = TrainState(trained, _optimizer(trained, config), config, per_epoch, total_steps)
    state.loss_kind = tasks.loss_for(model, dataset, config.loss)
    _training_mode(state)
    state.metric = metric_for(model, dataset)
    if state.loss_kind == "distill" or state.metric not in ("accuracy", "perplexity"):
        state.teacher = clone_model(teacher if teacher is not None else model, fold_masks=True).to(device).eval()
        state.teacher.requires_grad_(False)
    use_amp = bool(config.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    result = TrainResult(model=trained, device=str(device))
    started = time.perf_counter()
    first_epoch, skipped = divmod(start_step, per_epoch)
    for epoch in range(first_epoch + 1, config.epochs + 1):
        loss_sum, seen = 0.0, 0
        batches = dataset.batches("train", config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch)
        for step, (x, y) in enumerate(batches, start=1):
            if epoch == first_epoch + 1 and step <= skipped:
                continue  # the run being replayed took these steps before start_step
            if cancel is not None and cancel.is_set():
                result.cancelled = True
                break
            state.epoch, state.step, state.global_step = epoch, step, (epoch - 1) * per_epoch + step - 1
            state.x, state.y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss_value = _take_step(state, callbacks, scaler, use_amp)
            result.steps += 1
            loss_sum += loss_value * len(y)
            seen += len(y)
            if progress is not None:
                progress(Progress(epoch, config.epochs, step, per_epoch, loss_value))
            if state.stop:
                break
        if seen:
            _end_epoch(state, dataset, result, loss_sum / seen, callbacks, progress)
        if result.cancelled or state.stop:
            break
    trained.eval()
    result.stopped = state.stop
    result.seconds = time.perf_counter() - started
    return result


def _training_mode(state: TrainState) -> None:
    """Train mode, except that a student being distilled runs deterministically (eval mode).

    The teacher is deterministic; dropout noise in the student would swamp the small distance a
    pruned model has to close (tiny_bert at 50 %: 1 - cosine of the pruned embeddings is 1e-4, the
    dropout noise 7e-3, and fidelity got worse instead of better). BatchNorm then keeps its running
    statistics, as the dense model it imitates has them.
    """
    state.model.train(state.loss_kind != "distill")


def metric_for(model: nn.Module, dataset: Dataset) -> str:
    """The metric validation reports: accuracy, perplexity, or fidelity's measure (top1 or cosine)."""
    task = tasks.task_for(model, dataset)
    return tasks.default_measure(model) if task == "fidelity" else task


def validation_metric(state: TrainState, dataset: Dataset) -> float:
    """The task metric ``state.metric`` of the live model on the validation split (NaN if it is empty)."""
    if not len(dataset.y_val):
        return float("nan")
    try:
        if state.metric == "accuracy":
            return evaluate(state.model, dataset, "val")["accuracy"]
        if state.metric == "perplexity":
            return tasks.perplexity(state.model, dataset, "val")
        return tasks.fidelity(state.model, state.teacher, dataset, "val")[state.metric]
    finally:
        _training_mode(state)


def _end_epoch(state: TrainState, dataset: Dataset, result: TrainResult, loss: float,
               callbacks: Sequence[Callback], progress: Callable[[Progress], None] | None) -> None:
    """Validate, record the history row, report, and call ``on_epoch_end`` if the epoch completed."""
    complete = state.step == state.steps_per_epoch
    value = validation_metric(state, dataset)
    accuracy = value if state.metric == "accuracy" else None
    result.history.append({"epoch": state.epoch, "loss": loss, "loss_kind": state.loss_kind, "metric": state.metric,
                           "val_metric": value, "val_accuracy": accuracy, "partial": not complete})
    if progress is not None:
        progress(Progress(state.epoch, state.config.epochs, state.step, state.steps_per_epoch, loss, value,
                          state.metric))
    if complete:
        result.epochs_done += 1
        state.val_metric, state.val_accuracy = value, accuracy
        for callback in callbacks:
            callback.on_epoch_end(state)


def start_training(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None, *,
                   callbacks: Sequence[Callback] = (), start_step: int = 0, name: str = "Training",
                   meta: dict | None = None, teacher: nn.Module | None = None) -> jobs.Job:
    """`train` in a background `explorer.jobs.Job`, for pages that must not block.

    The job's payload grows into a live curve: ``step_loss`` gets (global step, loss) after every
    step and ``val_metric`` (global step, value of the task metric) after every epoch, plus
    ``val_accuracy`` (the same points) when that metric is accuracy (`metric_for` names the
    metric); ``status`` reads 'epoch e/E, step s/S'. ``job.cancel.set()`` stops at the next step and ``job.result`` is then
    the partially trained `TrainResult` (``cancelled=True``).
    """
    def work(context: jobs.JobContext) -> TrainResult:
        def report(progress: Progress) -> None:
            if progress.metric is None:
                context.append("step_loss", (progress.global_step, progress.loss))
                context.report(progress.fraction, f"epoch {progress.epoch}/{progress.epochs}, "
                                                  f"step {progress.step}/{progress.steps_per_epoch}")
            else:
                context.append("val_metric", (progress.global_step, progress.metric))
                if progress.metric_name == "accuracy":
                    context.append("val_accuracy", (progress.global_step, progress.metric))

        return train(model, dataset, config, progress=report, cancel=context.cancel, callbacks=callbacks,
                     start_step=start_step, teacher=teacher)

    return jobs.start(work, name=name, meta=meta)
