"""Trained baselines, cached on disk so the app opens on a trained model in seconds.

A baseline is keyed by (model, dataset, seed, hyper-parameters): change any of them and it
is trained again. The cache lives in ``$PRUNING_EXPLORER_CACHE`` (default
``~/.cache/pruning-explorer``); each entry is a weights file written by `models.save_model`
(read back with ``weights_only=True``) plus a JSON file of its accuracy and training time.
"""
from __future__ import annotations

import hashlib
import math
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.models import build, load_model, save_model
from explorer.train import CancelFlag, Progress, TrainConfig, evaluate, train
from explorer.zoo import ZOO

# Hyper-parameters that reach the recorded accuracies on a 2-core CPU (see README).
DEFAULT_CONFIGS: dict[tuple[str, str], TrainConfig] = {
    ("mlp", "digits"): TrainConfig(epochs=30, lr=2e-3, batch_size=32),
    ("lenet5", "digits"): TrainConfig(epochs=30, lr=2e-3, batch_size=32),
    ("vgg_small", "digits"): TrainConfig(epochs=15, lr=2e-3, batch_size=32),
    ("resnet20", "digits"): TrainConfig(epochs=15, lr=2e-3, batch_size=32),
    ("mobilenetv2_small", "digits"): TrainConfig(epochs=20, lr=2e-3, batch_size=32),
    ("conv1d", "mnist1d"): TrainConfig(epochs=20, lr=2e-3, batch_size=64, weight_decay=1e-4, optimizer="adamw"),
    ("mlp", "mnist1d"): TrainConfig(epochs=30, lr=2e-3, batch_size=64),
    ("vgg_small", "shapes"): TrainConfig(epochs=3, lr=2e-3, batch_size=64),
    ("resnet20", "shapes"): TrainConfig(epochs=3, lr=2e-3, batch_size=64),
    ("mobilenetv2_small", "shapes"): TrainConfig(epochs=3, lr=3e-3, batch_size=64),
    ("lenet5", "shapes"): TrainConfig(epochs=8, lr=2e-3, batch_size=64),
    ("mlp", "shapes"): TrainConfig(epochs=8, lr=1e-3, batch_size=64),
    ("vit_small", "shapes"): TrainConfig(epochs=6, lr=2e-3, batch_size=64),
}


def default_config(model_name: str, dataset_name: str, seed: int = 0, train_size: int | None = None) -> TrainConfig:
    """The recorded hyper-parameters for a pair, or a generic choice sized to the data.

    The generic choice aims at about 400 optimiser steps (between 10 and 100 epochs), so a
    small user dataset is not left under-trained and a large one does not take all day.
    """
    config = DEFAULT_CONFIGS.get((model_name, dataset_name))
    if config is None:
        epochs = 10
        if train_size:
            steps_per_epoch = math.ceil(train_size / 64)
            epochs = max(10, min(100, math.ceil(400 / steps_per_epoch)))
        config = TrainConfig(epochs=epochs, lr=2e-3, batch_size=64)
    return replace(config, seed=seed)


def start_epochs(spec, train_size: int | None = None) -> int:
    """The epochs of training that made the start model a ModelSpec describes, 0 when unknown.

    A zoo baseline trained its default config (`default_config`); a file or factory model the
    Model page trained further counts those ``train_epochs``. The methods lab counts them in a
    budget (`explorer.specs.BudgetSpec`) so that methods from fresh weights are not short-changed.
    """
    if spec.baseline and spec.source in ZOO:
        return default_config(spec.source, spec.data or ZOO[spec.source].default_dataset,
                              train_size=train_size).epochs
    return int(spec.train_epochs or 0)


def cache_dir() -> Path:
    root = os.environ.get("PRUNING_EXPLORER_CACHE") or Path.home() / ".cache" / "pruning-explorer"
    path = Path(root) / "baselines"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(model_name: str, dataset_name: str, config: TrainConfig) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k != "device"}
    text = json.dumps({"model": model_name, "data": dataset_name, "config": settings, "v": 1}, sort_keys=True)
    return f"{model_name}-{dataset_name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def is_cached(model_name: str, dataset_name: str, config: TrainConfig) -> bool:
    """Whether a trained baseline for these settings is already on disk (no training needed)."""
    key = cache_key(model_name, dataset_name, config)
    return (cache_dir() / f"{key}.pt").exists() and (cache_dir() / f"{key}.json").exists()


@dataclass(frozen=True)
class Baseline:
    """A trained model with its test accuracy and where it came from."""

    model: nn.Module
    model_name: str
    dataset_name: str
    config: TrainConfig
    accuracy: float
    loss: float
    train_seconds: float
    from_cache: bool
    path: Path | None


def baseline(model_name: str, dataset: Dataset, *, config: TrainConfig | None = None, seed: int = 0,
             use_cache: bool = True, progress: Callable[[Progress], None] | None = None,
             cancel: CancelFlag | None = None) -> Baseline:
    """Return the trained baseline of a zoo model on a dataset, training it if not cached."""
    config = config or default_config(model_name, dataset.name, seed, train_size=len(dataset.y_train))
    key = cache_key(model_name, dataset.name, config)
    weights_path = cache_dir() / f"{key}.pt"
    info_path = cache_dir() / f"{key}.json"
    if use_cache and dataset.name != "tensors" and is_cached(model_name, dataset.name, config):
        try:
            model = load_model(str(weights_path))
            info = json.loads(info_path.read_text())
            return Baseline(model, model_name, dataset.name, config, info["accuracy"], info["loss"],
                            info["train_seconds"], True, weights_path)
        except (ExplorerError, KeyError, ValueError):
            pass  # a damaged cache entry is simply retrained
    torch.manual_seed(config.seed)
    fresh = build(model_name, dataset.input_shape, dataset.num_classes)
    result = train(fresh, dataset, config, progress=progress, cancel=cancel)
    model = result.model.cpu().eval()
    metrics = evaluate(model, dataset, "test")
    if use_cache and not result.cancelled and dataset.name != "tensors":
        save_model(model, weights_path, arch=model_name, input_shape=dataset.input_shape,
                   num_classes=dataset.num_classes)
        info_path.write_text(json.dumps({"accuracy": metrics["accuracy"], "loss": metrics["loss"],
                                         "train_seconds": result.seconds, "config": config.to_dict()}))
    return Baseline(model, model_name, dataset.name, config, metrics["accuracy"], metrics["loss"],
                    result.seconds, False, weights_path if use_cache else None)
