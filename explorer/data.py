"""Datasets that need no download: real, generated, or supplied by the user.

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 real images, ships with scikit-learn).
- ``mnist1d``: the mnist1d generator run locally (never its download path): 1-D signals of 40 steps.
- ``shapes``: synthetic 3x32x32 images of eight shape classes with random colour, size, position
  and noise, generated deterministically; big enough that a ResNet-20 has real work to do.
- ``tensors``: a user file (``.pt`` or ``.npz``) holding ``x`` and ``y``.

Every dataset is split into train / validation / test with a seeded permutation, so the same
seed gives the same split on every machine. Calibration batches (for data-driven importance
scores) come from the training split.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from explorer import limits
from explorer.errors import ExplorerError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as tensors, already split."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    description: str = ""
    info: dict = field(default_factory=dict)

    def split(self, split: str) -> Batch:
        """The (x, y) tensors of ``train``, ``val`` or ``test``."""
        if split not in ("train", "val", "test"):
            raise ExplorerError(f"Unknown split '{split}': use train, val or test.")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Iterate over a split in mini-batches; shuffling is seeded, so it is reproducible."""
        x, y = self.split(split)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for start in range(0, len(y), batch_size):
            index = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield x[index], y[index]

    def calibration(self, n_batches: int, batch_size: int = 64, *, seed: int = 0) -> list[Batch]:
        """A few training batches for data-driven importance scores (gradients, Taylor, SNIP...)."""
        if n_batches < 1:
            raise ExplorerError("Data-driven criteria need at least one calibration batch.")
        batches = []
        for batch in self.batches("train", batch_size, shuffle=True, seed=seed):
            batches.append(batch)
            if len(batches) == n_batches:
                break
        return batches

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A real input batch of the dataset's shape (for tracing, FLOPs and latency).

        Test rows first; a split smaller than ``batch`` is repeated (token ids must stay token ids,
        so never made-up values), falling back to validation and training rows when the test split is empty.
        """
        rows = next((x for x in (self.x_test, self.x_val, self.x_train) if len(x)), None)
        if rows is None:
            return torch.zeros(batch, *self.input_shape)
        repeats = -(-batch // len(rows))
        return rows.repeat(repeats, *([1] * (rows.dim() - 1)))[:batch].clone()

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int, *, class_names, description: str,
           fractions: tuple[float, float] = (0.7, 0.15), info: dict | None = None) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_train = int(round(fractions[0] * len(y)))
    n_val = int(round(fractions[1] * len(y)))
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    return Dataset(
        name=name, input_shape=tuple(xt.shape[1:]), num_classes=len(class_names), class_names=tuple(class_names),
        x_train=xt[:n_train], y_train=yt[:n_train],
        x_val=xt[n_train:n_train + n_val], y_val=yt[n_train:n_train + n_val],
        x_test=xt[n_train + n_val:], y_test=yt[n_train + n_val:],
        description=description, info=info or {},
    )


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1] and standardised; 70/15/15 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0 - 0.3) / 0.4
    return _split("digits", x[:, None], bunch.target.astype(np.int64), seed,
                  class_names=[str(d) for d in range(10)],
                  description="8x8 handwritten digits (scikit-learn), 1,797 images, 10 classes.")


def mnist1d(seed: int = 0, num_samples: int = 10000) -> Dataset:
    """mnist1d generated on the fly (Greydanus 2020): 40-step signals, 10 classes."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = 42 + seed
    state = np.random.get_state()  # the generator seeds numpy's global RNG; leave it as we found it
    try:
        generated = make_dataset(args)
    finally:
        np.random.set_state(state)
    x = np.concatenate([generated["x"], generated["x_test"]]).astype(np.float32)
    y = np.concatenate([generated["y"], generated["y_test"]]).astype(np.int64)
    return _split("mnist1d", x[:, None], y, seed, class_names=[str(d) for d in range(10)],
                  description=f"mnist1d generated locally: {len(y):,} signals of length 40, 10 classes.")


SHAPE_CLASSES = ("disc", "ring", "square", "frame", "triangle", "plus", "diamond", "x")


def _shape_masks(kind: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    dist2 = dx ** 2 + dy ** 2
    cheb = np.maximum(ax, ay)
    masks = np.stack([
        dist2 <= r ** 2,
        (dist2 <= r ** 2) & (dist2 >= (0.55 * r) ** 2),
        cheb <= 0.85 * r,
        (cheb <= 0.85 * r) & (cheb >= 0.5 * r),
        (dy <= 0.8 * r) & (ax <= (dy + r) * 0.6),
        ((ax <= 0.28 * r) & (ay <= r)) | ((ay <= 0.28 * r) & (ax <= r)),
        ax + ay <= r,
        ((np.abs(dx - dy) <= 0.4 * r) | (np.abs(dx + dy) <= 0.4 * r)) & (cheb <= 0.8 * r),
    ])
    return np.take_along_axis(masks, kind[None, :, None, None], axis=0)[0]


def shapes(seed: int = 0, num_samples: int = 6000, side: int = 32) -> Dataset:
    """Synthetic colour images of eight shapes; generated deterministically from ``seed``.

    Each image has a random dark background, a shape of random colour, size and position,
    and Gaussian pixel noise, so a small network needs a few epochs to exceed 90 %.
    """
    if num_samples < len(SHAPE_CLASSES) * 4:
        raise ExplorerError(f"shapes needs at least {len(SHAPE_CLASSES) * 4} samples.")
    rng = np.random.default_rng(1000 + seed)
    n = int(num_samples)
    kind = np.arange(n) % len(SHAPE_CLASSES)
    rng.shuffle(kind)
    radius = rng.uniform(0.13, 0.32, n) * side
    cx = rng.uniform(radius, side - radius)
    cy = rng.uniform(radius, side - radius)
    grid = np.arange(side, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    mask = _shape_masks(kind, dx, dy, radius[:, None, None]).astype(np.float32)
    background = rng.uniform(0.0, 0.35, (n, 3, 1, 1)).astype(np.float32)
    colour = rng.uniform(0.45, 1.0, (n, 3, 1, 1)).astype(np.float32)
    images = background + (colour - background) * mask[:, None]
    images += rng.normal(0.0, 0.3, images.shape).astype(np.float32)
    images = (images - 0.45) / 0.3
    return _split("shapes", images.astype(np.float32), kind.astype(np.int64), seed, class_names=SHAPE_CLASSES,
                  fractions=(0.8, 0.1),
                  description=f"Synthetic 3x{side}x{side} shapes: {n:,} images, {len(SHAPE_CLASSES)} classes.")


def tensors(path: str | Path | bytes, seed: int = 0, name: str = "tensors") -> Dataset:
    """A user's own data: a ``.pt`` file (dict with ``x`` and ``y``) or an ``.npz`` with arrays x, y.

    ``x`` is (N, C, ...) floats, ``y`` is N integer labels 0..K-1. Files are read without
    unpickling code (``weights_only=True`` / ``allow_pickle=False``).
    """
    if isinstance(path, (bytes, bytearray)):
        raw, label = bytes(path), name
    else:
        path = Path(path)
        if not path.is_file():
            raise ExplorerError(f"Data file '{path}' does not exist.")
        raw, label = path.read_bytes(), path.name
    try:
        if raw[:2] == b"PK" and b"x.npy" in raw[:4096] or str(label).endswith(".npz"):
            with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                x, y = archive["x"], archive["y"]
        else:
            payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            if not isinstance(payload, dict):
                raise ExplorerError(f"'{label}' must hold a dict with keys 'x' and 'y'.")
            x, y = payload["x"], payload["y"]
    except ExplorerError:
        raise
    except KeyError as exc:
        raise ExplorerError(f"'{label}' must contain both 'x' (inputs) and 'y' (labels); missing {exc}.") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise ExplorerError(f"Cannot read '{label}' as .pt or .npz data ({type(exc).__name__}). "
                            "Save a dict {'x': tensor, 'y': tensor} with torch.save or np.savez.") from exc
    x, y = _array(x, "x", label), _array(y, "y", label)
    if x.ndim < 2 or len(x) != len(y) or y.ndim != 1:
        raise ExplorerError(f"'{label}': x must be (N, features...) and y (N,) labels; got x {x.shape}, y {y.shape}.")
    if x.ndim == 2:
        x = x[:, None]
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise ExplorerError(f"'{label}': labels y must be integers 0..K-1.")
    if len(y) < 20:
        raise ExplorerError(f"'{label}' has only {len(y)} samples; at least 20 are needed to split.")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ExplorerError(f"'{label}': x contains NaN or infinite values; clean the data first.")
    if y.min() < 0:
        raise ExplorerError(f"'{label}': labels must be >= 0.")
    if y.max() >= limits.MAX_CLASSES:
        raise ExplorerError(f"'{label}': labels go up to {int(y.max()):,}; labels are class numbers 0..K-1 with "
                            f"at most {limits.MAX_CLASSES:,} classes: renumber them.")
    classes = int(y.max()) + 1
    return _split(name, x, y.astype(np.int64), seed, class_names=[str(c) for c in range(classes)],
                  description=f"User tensors from {label}: {len(y):,} samples, {classes} classes.")


def _array(values, name: str, label: str) -> np.ndarray:
    """``values`` (a tensor or array) as a numeric numpy array; any other dtype is one line naming it."""
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise ExplorerError(f"'{label}': {name} is a {values.dtype} tensor; store real numbers (float32 inputs, "
                                "integer labels).")
        values = values.detach().float() if values.is_floating_point() and values.dtype != torch.float64 \
            else values.detach()  # numpy has no bfloat16
        return values.numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise ExplorerError(f"'{label}': {name} holds {array.dtype} values, not numbers; store float32 inputs "
                            "and integer labels.")
    return array


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    loader: Callable[..., Dataset]


DATASETS: dict[str, DatasetEntry] = {entry.name: entry for entry in (
    DatasetEntry("digits", "scikit-learn 8x8 handwritten digits (real, 1,797 images).", digits),
    DatasetEntry("mnist1d", "mnist1d generated locally (1-D signals, 10 classes).", mnist1d),
    DatasetEntry("shapes", "Synthetic 3x32x32 colour shapes (8 classes, 6,000 images).", shapes),
    DatasetEntry("tensors", "Your own .pt / .npz file with x and y.", tensors),
)}


@functools.lru_cache(maxsize=8)
def _cached(name: str, seed: int) -> Dataset:
    return DATASETS[name].loader(seed=seed)


def load_dataset(name: str, *, seed: int = 0, path: str | Path | None = None) -> Dataset:
    """Load a dataset by registry name (``tensors`` also needs ``path``); generated sets are cached."""
    if name not in DATASETS:
        raise ExplorerError(f"Unknown dataset '{name}'. Choose one of: {', '.join(DATASETS)}.")
    if name == "tensors":
        if path is None:
            raise ExplorerError("The 'tensors' dataset needs a file: give the path of a .pt or .npz with x and y.")
        return tensors(path, seed=seed)
    return _cached(name, int(seed))
