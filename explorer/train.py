"""Training and evaluation: baselines, fine-tunes after pruning, and the device they run on.

`train` works on a *copy* of the model it is given and returns it, so a cached base model is
never changed. It reports progress through a callback (epoch, step, loss, metric) and checks a
cancellation flag every step: a cancelled run keeps the partially trained copy. Masks from
``torch.nn.utils.prune`` stay enforced during training (pruned weights stay zero).
Determinism: the seed fixes initial shuffling and dropout; CPU runs repeat bit-for-bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.layers import choose_device, clone_model, model_device

OPTIMIZERS = ("adam", "adamw", "sgd")


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after every step (``metric`` is set at epoch ends)."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    metric: float | None = None

    @property
    def fraction(self) -> float:
        total = max(1, self.epochs * self.steps_per_epoch)
        return min(1.0, ((self.epoch - 1) * self.steps_per_epoch + self.step) / total)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; plain data, so it can key a cache and a recipe."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"  # "cosine" or "constant"
    seed: int = 0
    amp: bool = False
    device: str = "auto"

    def validate(self) -> "TrainConfig":
        if self.epochs < 0 or self.batch_size < 1:
            raise ExplorerError("Epochs must be >= 0 and batch size >= 1.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ExplorerError(f"Learning rate must be a positive number, got {self.lr}.")
        if self.optimizer not in OPTIMIZERS:
            raise ExplorerError(f"Unknown optimizer '{self.optimizer}': use one of {', '.join(OPTIMIZERS)}.")
        if self.schedule not in ("cosine", "constant"):
            raise ExplorerError(f"Unknown schedule '{self.schedule}': use cosine or constant.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """A trained copy of the model plus what happened while training it."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)  # one row per epoch: epoch, loss, val_accuracy
    cancelled: bool = False
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


def train(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None, *,
          progress: Callable[[Progress], None] | None = None, cancel: CancelFlag | None = None,
          step_hook: Callable[[nn.Module, int], None] | None = None) -> TrainResult:
    """Train a copy of ``model`` on the training split; return it with its history.

    ``progress`` is called after every step; ``cancel.is_set()`` is checked before every step
    and stops training early, keeping what was learned. ``step_hook(model, global_step)`` runs
    after each optimiser step (used by schedules such as gradual pruning or sparse training).
    Mixed precision (``amp``) is used only on CUDA.
    """
    config = (config or TrainConfig()).validate()
    device = choose_device(config.device)
    torch.manual_seed(config.seed)
    trained = clone_model(model).to(device)
    trained.train()
    optimizer = _optimizer(trained, config)
    steps_per_epoch = max(1, math.ceil(len(dataset.y_train) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    scheduler = None
    if config.schedule == "cosine" and total_steps > 0:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    use_amp = bool(config.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    result = TrainResult(model=trained, device=str(device))
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        loss_sum, seen = 0.0, 0
        for step, (x, y) in enumerate(dataset.batches("train", config.batch_size, shuffle=True,
                                                      seed=config.seed * 1000 + epoch), start=1):
            if cancel is not None and cancel.is_set():
                result.cancelled = True
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = F.cross_entropy(trained(x), y)
            if not torch.isfinite(loss):
                raise ExplorerError(f"Training diverged (loss is {loss.item()}) at epoch {epoch}, step {step}. "
                                    "Lower the learning rate.")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            result.steps += 1
            if step_hook is not None:
                step_hook(trained, result.steps)
            loss_value = loss.item()
            loss_sum += loss_value * len(y)
            seen += len(y)
            if progress is not None:
                progress(Progress(epoch, config.epochs, step, steps_per_epoch, loss_value))
        if seen:
            val = evaluate(trained, dataset, "val") if len(dataset.y_val) else {"accuracy": float("nan")}
            trained.train()
            result.history.append({"epoch": epoch, "loss": loss_sum / seen, "val_accuracy": val["accuracy"],
                                   "partial": result.cancelled})
            if progress is not None:
                progress(Progress(epoch, config.epochs, steps_per_epoch, steps_per_epoch, loss_sum / seen,
                                  val["accuracy"]))
            result.epochs_done = epoch - (1 if result.cancelled else 0)
        if result.cancelled:
            break
    trained.eval()
    result.seconds = time.perf_counter() - started
    return result
