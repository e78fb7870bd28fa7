"""The parts of an experiment as plain, frozen, validated data: model, scoring, plan, method, measure.

A `explorer.recipe.Recipe` is made of these parts, and the pipeline takes them instead of long
lists of loose arguments, so the app, the CLI, scans and sweeps all describe the same choice the
same way. Each part has ``validate()``, which raises one `ExplorerError` naming the bad field and
what is allowed, and each round-trips through plain dicts (YAML / JSON).

Example::

    scoring = ScoringSpec(structure="channel", criterion="taylor", calib_batches=2).validate()
    plan = PlanSpec(sparsity=0.5, scope="global", min_keep=0.05).validate()
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from explorer import criteria, limits, planner
from explorer.errors import ExplorerError

STRUCTURES: dict[str, str] = {
    "unstructured": "Single weights are zeroed by masks; the tensors keep their dense shape.",
    "channel": "Whole filters / neurons are removed, with every coupled layer shrinking too.",
    "head": "Transformers: whole attention heads and FFN neurons are removed; head counts are updated.",
    "nm": "N:M semi-structured masks: in every group of M consecutive weights of a row, M-N are zeroed (2:4 = 50 %).",
}

def _fail(section: str, message: str) -> ExplorerError:
    return ExplorerError(f"recipe: {section}.{message}")


def _fraction(section: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise _fail(section, f"{name} must be a number in [0, 1], got {value!r}.")


def _positive_int(section: str, name: str, value, high: int) -> None:
    """A whole number in [1, high]: the high bound (`explorer.limits`) refuses a typo before work starts."""
    try:
        limits.check_int(name, value, 1, high)
    except ExplorerError as exc:
        raise _fail(section, str(exc)) from None


def _optional_text(section: str, name: str, value) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(section, f"{name} must be text (or left out), got {value!r}.")


DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_device(section: str, device: str) -> None:
    """A device name torch can parse and this project runs on (whether it is present is checked at run time)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in DEVICE_KINDS:
        raise _fail(section, f"device {device!r} is not a device: use {', '.join(DEVICE_KINDS)} "
                             "(with an index, e.g. cuda:0) or leave it out.")


def _yaml_number(value):
    """YAML 1.1 reads ``1e-3`` (no dot) as text; a number field takes it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build(cls, section: str, values: Mapping[str, Any] | None):
    """``cls(**values)`` validated, refusing unknown keys (a typo must not pass silently)."""
    if values is None:
        return cls().validate()
    if not isinstance(values, Mapping):
        raise ExplorerError(f"recipe: '{section}' must be a mapping of settings, got {type(values).__name__}.")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    known = list(types)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ExplorerError(f"recipe: unknown setting(s) {', '.join(unknown)} in '{section}'; "
                            f"known: {', '.join(known)}.")
    values = {name: _yaml_number(value) if "float" in str(types.get(name, "")) else value
              for name, value in values.items()}
    try:
        spec = cls(**values)
    except TypeError as exc:
        raise ExplorerError(f"recipe: '{section}' {exc}") from exc
    return spec.validate()


@dataclass(frozen=True)
class ModelSpec:
    """Where the model and its data come from.

    ``source`` is a zoo name, a built-in transformer (``minilm``, ``tiny_bert``, ``tiny_gpt2``),
    ``hf:FOLDER`` (a local Hugging Face folder), a model file or a ``package.module:callable``
    factory; ``data: text`` is the built-in English text, or ``data_file`` (.txt / .jsonl / .csv)
    tokenised with the model's tokenizer; ``baseline``
    (zoo names only) starts from the trained, cached baseline instead of fresh weights;
    ``train_epochs`` trains a file or factory model for a few epochs before pruning, as the
    Model page offers. ``data`` defaults to the zoo model's usual dataset (digits otherwise).
    """

    source: str = "mlp"
    data: str | None = None
    data_file: str | None = None
    arch: str | None = None
    weights: str | None = None
    baseline: bool = True
    train_epochs: int = 0
    trust_pickle: bool = False

    def validate(self) -> "ModelSpec":
        if not isinstance(self.source, str) or not self.source:
            raise _fail("model", "source must name a zoo model, a model file or a package.module:callable factory.")
        from explorer.data import DATASETS

        if self.data is not None and self.data not in DATASETS and self.data != "text":
            raise _fail("model", f"data '{self.data}' is not one of {', '.join([*DATASETS, 'text'])}.")
        if self.data == "tensors" and not self.data_file:
            raise _fail("model", "data_file must name the .pt/.npz file when data is 'tensors'.")
        for name in ("data_file", "arch", "weights"):
            _optional_text("model", name, getattr(self, name))
        for name in ("baseline", "trust_pickle"):
            if not isinstance(getattr(self, name), bool):
                raise _fail("model", f"{name} must be true or false, got {getattr(self, name)!r}.")
        try:
            limits.check_int("train_epochs", self.train_epochs, 0, limits.MAX_EPOCHS)
        except ExplorerError as exc:
            raise _fail("model", str(exc)) from None
        return self


@dataclass(frozen=True)
class ScoringSpec:
    """What is scored (structure) and how (criterion, norm, calibration data).

    On a causal language model only the Linears inside the transformer blocks are scored, as
    the Wanda and SparseGPT papers prune (`explorer.blocks`): ``include_head`` also scores the
    layers outside them (the LM head; embeddings are never prunable layers).

    Calibration on text (`explorer.text.calibration`): ``calib_samples`` sequences of
    ``calib_seqlen`` tokens, cut as ``calib_mode`` "windows" from the token stream (the papers'
    way) or "lines" (one example each, padding ignored). Left unset, a transformer calibrates on
    ``calib_batches`` x ``calib_batch_size`` padded lines of the dataset's own length.
    ``sequential`` (Wanda, SparseGPT) calibrates each transformer block on the outputs of the
    already pruned blocks before it, as the papers' code does; off, every layer is calibrated in one
    pass of the dense model (`explorer.blocks`).
    """

    structure: str = "unstructured"
    criterion: str = "magnitude"
    norm: str = "l1"
    calib_batches: int = 4
    calib_batch_size: int = 64
    nm: str = "2:4"
    include_head: bool = False
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    calib_mode: str = "lines"
    sequential: bool = False

    @property
    def shaped_text(self) -> bool:
        """True when calibration is shaped by samples / sequence length / mode (`explorer.text.calibration`)."""
        return self.calib_samples is not None or self.calib_seqlen is not None or self.calib_mode != "lines"

    @property
    def nm_pair(self) -> tuple[int, int]:
        from explorer.llm import parse_nm

        return parse_nm(self.nm)

    def validate(self) -> "ScoringSpec":
        if self.structure not in STRUCTURES:
            raise _fail("scoring", f"structure '{self.structure}' is not one of {', '.join(STRUCTURES)}.")
        if self.criterion not in criteria.CRITERIA:
            raise _fail("scoring", f"criterion '{self.criterion}' is not one of {', '.join(criteria.CRITERIA)}.")
        if self.norm not in criteria.NORMS:
            raise _fail("scoring", f"norm must be one of {', '.join(criteria.NORMS)}, got {self.norm!r}.")
        _positive_int("scoring", "calib_batches", self.calib_batches, limits.MAX_CALIB_BATCHES)
        if self.calib_samples is not None:
            _positive_int("scoring", "calib_samples", self.calib_samples, limits.MAX_BATCH)
        if self.calib_seqlen is not None:
            _positive_int("scoring", "calib_seqlen", self.calib_seqlen, limits.MAX_SEQ_LEN)
        from explorer.text import CALIB_MODES

        if self.calib_mode not in CALIB_MODES:
            raise _fail("scoring", f"calib_mode must be one of {', '.join(CALIB_MODES)}, got {self.calib_mode!r}.")
        if not isinstance(self.sequential, bool):
            raise _fail("scoring", f"sequential must be true or false, got {self.sequential!r}.")
        if self.sequential and (self.criterion not in ("wanda", "sparsegpt")
                                or self.structure not in ("unstructured", "nm")):
            raise _fail("scoring", "sequential calibration is for wanda and sparsegpt, unstructured or nm; "
                                   f"not {self.criterion} / {self.structure}.")
        if not isinstance(self.include_head, bool):
            raise _fail("scoring", f"include_head must be true or false, got {self.include_head!r}.")
        _positive_int("scoring", "calib_batch_size", self.calib_batch_size, limits.MAX_BATCH)
        try:
            self.nm_pair
        except ExplorerError as exc:
            raise _fail("scoring", f"nm: {exc}") from exc
        return self


@dataclass(frozen=True)
class PlanSpec:
    """How much goes where: target sparsity, scope, protected layers, per-layer overrides, guard."""

    sparsity: float = 0.5
    scope: str = "local"
    protect: tuple[str, ...] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)
    min_keep: float = 0.0
    round_to: int = 1  # channel structures: kept channels per layer rounded to a multiple of this (8, 16, 32)

    def __post_init__(self):  # YAML gives lists and plain dicts; keep the frozen value canonical
        object.__setattr__(self, "protect", tuple(self.protect or ()))
        object.__setattr__(self, "overrides", dict(self.overrides or {}))

    def validate(self) -> "PlanSpec":
        _fraction("plan", "sparsity", self.sparsity)
        _fraction("plan", "min_keep", self.min_keep)
        if self.scope not in planner.SCOPES:
            raise _fail("plan", f"scope '{self.scope}' is not one of {', '.join(planner.SCOPES)}.")
        for name, value in self.overrides.items():
            _fraction("plan", f"overrides[{name}]", value)
        if not all(isinstance(name, str) for name in self.protect):
            raise _fail("plan", f"protect must be a list of layer names, got {list(self.protect)!r}.")
        _positive_int("plan", "round_to", self.round_to, 1024)
        return self


@dataclass(frozen=True)
class MethodSpec:
    """How pruning unfolds over training time (`explorer.methods`); ``params`` are the method's own settings.

    In a recipe they sit beside the name: ``method: {name: gradual, regrow: true}``.
    """

    name: str = "one_shot"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", dict(self.params or {}))

    def validate(self) -> "MethodSpec":
        from explorer.methods import method_params  # the registry imports the pipeline, which imports specs

        method_params(self.name, self.params)
        return self


BUDGET_VIEWS = {
    "counted": "count the training that made the start model: a method that starts from fresh weights gets "
               "it on top of the budget, so every result stands on the same training (RigL's accounting)",
    "fresh": "same budget from fresh weights: every method starts from fresh weights; one that prunes a trained "
             "model first trains a fresh dense copy for half the budget",
}


@dataclass(frozen=True)
class BudgetSpec:
    """The training a method may spend in total, in epochs, so methods compare at equal cost.

    Methods that prune the trained start model get its training for free unless the budget says
    how to count it (``view``): ``counted`` adds ``start_epochs`` (the training that made the start
    model) to the budget of every method that starts from fresh weights, as RigL's comparison counts
    dense pre-training in every method's training FLOPs; ``fresh`` starts every method from fresh
    weights with ``epochs``. ``start_epochs`` 0 (the default) gives every method ``epochs`` as before.
    """

    epochs: int = 8
    view: str = "counted"
    start_epochs: int = 0

    def validate(self) -> "BudgetSpec":
        _positive_int("budget", "epochs", self.epochs, limits.MAX_EPOCHS)
        if self.view not in BUDGET_VIEWS:
            raise _fail("budget", f"view must be one of {', '.join(BUDGET_VIEWS)}, got {self.view!r}.")
        if isinstance(self.start_epochs, bool) or not isinstance(self.start_epochs, int) \
                or not 0 <= self.start_epochs <= limits.MAX_EPOCHS:
            raise _fail("budget", f"start_epochs must be a whole number of epochs from 0 to {limits.MAX_EPOCHS}, "
                        f"got {self.start_epochs!r}.")
        if self.view == "fresh" and self.epochs < 2:
            raise _fail("budget", f"epochs must be at least 2 under view fresh (a dense copy trains for half "
                        f"the budget first), got {self.epochs}.")
        return self

    def epochs_for(self, from_scratch: bool) -> tuple[int, int]:
        """(dense epochs from fresh weights first, epochs for the method) under this view."""
        if self.view == "fresh":
            return (0, self.epochs) if from_scratch else (self.epochs // 2, self.epochs - self.epochs // 2)
        return 0, self.epochs + (self.start_epochs if from_scratch else 0)


DEFAULT_EVAL_TOKENS = 1024  # a perplexity's default token budget (the 7 B streamed rows' too): two whole-split
# perplexities of a 124 M model cost 8-14x its plan on this CPU, two of 2,048 tokens 3.3x, of 1,024 under 3x
# (bench/RESULTS_llm_scale.md); every output line says how many were scored, and 0 scores them all


@dataclass(frozen=True)
class MeasureSpec:
    """How the pruned copy is measured next to its base: the same call in the app, CLI and recipes.

    Latency is the median over many timed forward passes of one ``batch`` (both models with
    the same batch, threads, device and memory layout, interleaved); ``threads`` None keeps
    torch's current setting (lowered to the free cores on a busy CPU), ``device`` None measures
    where the model lives. Timing lasts at least ``min_run_time`` seconds and stops once the
    speed-up's 95 % interval is within 5 %, or after ``max_run_time`` (None: 3 s, or
    ``min_run_time`` if longer); a wider interval is reported as noisy. ``eval_tokens`` bounds a
    perplexity's cost: base and pruned are scored on the same first test sequences holding at most
    that many tokens, `DEFAULT_EVAL_TOKENS` unless set (0 or None: the whole split; `token_budget`).
    Only a causal LM's perplexity reads it.
    """

    latency: bool = True
    batch: int = 64
    threads: int | None = None
    device: str | None = None
    min_run_time: float = 0.5
    max_run_time: float | None = None
    runtimes: tuple[str, ...] = ()  # also time dense vs pruned on these runtimes (explorer.deploy.runtimes)
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS  # perplexity on the test split's first sequences up to this many

    def __post_init__(self):  # YAML gives a list
        object.__setattr__(self, "runtimes", tuple(self.runtimes or ()) if not isinstance(self.runtimes, str)
                           else (self.runtimes,))

    def validate(self) -> "MeasureSpec":
        if not isinstance(self.latency, bool):
            raise _fail("measure", f"latency must be true or false, got {self.latency!r}.")
        _positive_int("measure", "batch", self.batch, limits.MAX_BATCH)
        if self.threads is not None:
            _positive_int("measure", "threads", self.threads, limits.MAX_THREADS)
        _optional_text("measure", "device", self.device)
        if self.device is not None:
            check_device("measure", self.device)
        if isinstance(self.min_run_time, bool) or not isinstance(self.min_run_time, (int, float)) \
                or not 0 < self.min_run_time <= limits.MAX_SECONDS:
            raise _fail("measure", f"min_run_time must be a number of seconds in (0, {limits.MAX_SECONDS:g}], "
                                   f"got {self.min_run_time!r}.")
        if self.max_run_time is not None and (
                isinstance(self.max_run_time, bool) or not isinstance(self.max_run_time, (int, float))
                or not self.min_run_time <= self.max_run_time <= limits.MAX_SECONDS):
            raise _fail("measure", f"max_run_time must be a number of seconds in [min_run_time, "
                                   f"{limits.MAX_SECONDS:g}], got {self.max_run_time!r}.")
        if self.eval_tokens is not None:  # None: the whole split, as runs stored before the default was set
            try:
                limits.check_int("eval_tokens", self.eval_tokens, 0, limits.MAX_EVAL_TOKENS)
            except ExplorerError as exc:
                raise _fail("measure", f"{str(exc).rstrip('.')}; 0 scores the whole test split.") from None
        if self.runtimes:
            from explorer.deploy.runtimes import parse_runtimes

            try:
                parse_runtimes(list(self.runtimes))
            except ExplorerError as exc:
                raise _fail("measure", f"runtimes: {exc}") from None
        return self

    @property
    def token_budget(self) -> int | None:
        """``eval_tokens`` as `explorer.tasks.perplexity`'s ``max_tokens``: None for the whole split (0 or None)."""
        return self.eval_tokens or None
