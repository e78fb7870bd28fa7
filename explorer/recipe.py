"""A Recipe is every choice of one pruning experiment as plain data, so it can be re-run headless.

The app stores each run's settings; `recipe_from_run` turns them (or the ``run.yaml`` of a
downloaded run) back into a Recipe, and `run_recipe` replays the whole chain — baseline,
scores, plan, pruned copy, optional fine-tune, measurement — with the same core calls as the
app, so the same seed gives the same numbers. ``python -m explorer run --recipe FILE`` is the CLI.

Example ``recipe.yaml``::

    model: lenet5          # zoo name (its trained baseline), a model file or pkg.mod:callable
    data: digits
    structure: channel
    criterion: taylor
    scope: global
    sparsity: 0.5
    min_keep: 0.1
    finetune: {epochs: 2, lr: 0.001}
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from explorer import criteria, pipeline, planner
from explorer.errors import ExplorerError
from explorer.train import TrainConfig, train


@dataclass(frozen=True)
class Recipe:
    """What to prune, how to decide, how much, and whether to fine-tune afterwards."""

    model: str
    structure: str = "unstructured"
    criterion: str = "magnitude"
    scope: str = "local"
    sparsity: float = 0.5
    data: str | None = None
    data_file: str | None = None
    protect: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    min_keep: float = 0.0
    norm: str = "l1"
    calib_batches: int = 4
    seed: int = 0
    baseline: bool = True
    finetune: TrainConfig | None = None
    measure_latency: bool = True

    def validate(self) -> "Recipe":
        """Check every field; raise ExplorerError naming the first bad one and what is allowed."""
        if not isinstance(self.model, str) or not self.model:
            raise ExplorerError("recipe: 'model' must name a zoo model, a model file or a module:callable factory.")
        if self.structure not in pipeline.STRUCTURES:
            raise ExplorerError(f"recipe: structure '{self.structure}' is not one of {', '.join(pipeline.STRUCTURES)}.")
        if self.criterion not in criteria.CRITERIA:
            raise ExplorerError(f"recipe: criterion '{self.criterion}' is not one of {', '.join(criteria.CRITERIA)}.")
        if self.scope not in planner.SCOPES:
            raise ExplorerError(f"recipe: scope '{self.scope}' is not one of {', '.join(planner.SCOPES)}.")
        for name, value in (("sparsity", self.sparsity), ("min_keep", self.min_keep), *self.overrides.items()):
            if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
                raise ExplorerError(f"recipe: {name} must be a number in [0, 1], got {value!r}.")
        if self.norm not in ("l1", "l2"):
            raise ExplorerError(f"recipe: norm must be l1 or l2, got {self.norm!r}.")
        if not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ExplorerError("recipe: calib_batches must be a positive integer.")
        if self.finetune is not None:
            self.finetune.validate()
        return self

    def to_dict(self) -> dict:
        values = asdict(self)
        values["protect"] = list(self.protect)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Recipe":
        """Build and validate a Recipe; unknown keys are refused (a typo must not pass silently)."""
        if not isinstance(values, Mapping):
            raise ExplorerError("recipe: expected a mapping of settings (YAML or JSON object).")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExplorerError(f"recipe: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        values = dict(values)
        values["protect"] = tuple(values.get("protect") or ())
        values["overrides"] = dict(values.get("overrides") or {})
        finetune = values.get("finetune")
        if finetune is not None:
            train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
            extra = sorted(set(finetune) - train_fields)
            if extra:
                raise ExplorerError(f"recipe: unknown fine-tune setting(s) {', '.join(extra)}; "
                                    f"known: {', '.join(sorted(train_fields))}.")
            values["finetune"] = TrainConfig(**finetune)
        try:
            recipe = cls(**values)
        except TypeError as exc:
            raise ExplorerError(f"recipe: {exc}") from exc
        return recipe.validate()


def recipe_from_run(run: Mapping[str, Any]) -> Recipe:
    """The Recipe behind a stored run (a `store.Run.to_dict()` or a downloaded ``run.yaml``)."""
    settings = run.get("settings") or {}
    arch = settings.get("arch")
    if settings.get("model_source", "zoo") != "zoo" or not arch or run.get("dataset") == "tensors":
        raise ExplorerError("Only runs of a zoo model on a built-in dataset can be replayed from their settings "
                            "(an uploaded file or a trained factory is not in the run); write a recipe that "
                            "points at the model file instead.")
    finetune = settings.get("finetune")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return Recipe(
        model=arch, data=run.get("dataset"), structure=run["structure"], criterion=run["criterion"],
        scope=run["scope"], sparsity=float(run["sparsity"]), protect=tuple(settings.get("protect") or ()),
        overrides=dict(settings.get("overrides") or {}), min_keep=float(settings.get("min_keep", 0.0)),
        norm=settings.get("norm", "l1"), calib_batches=int(settings.get("calib_batches", 4)),
        seed=int(settings.get("seed", 0)), baseline=True,
        finetune=TrainConfig(**{k: v for k, v in finetune.items() if k in train_fields}) if finetune else None,
    ).validate()


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe (or a downloaded ``run.yaml`` / ``run.json``) from YAML or JSON."""
    path = Path(path)
    if not path.is_file():
        raise ExplorerError(f"Recipe file '{path}' does not exist.")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ExplorerError(f"'{path.name}' is not valid YAML or JSON: {str(exc).splitlines()[0]}") from exc
    if isinstance(values, Mapping) and "settings" in values and "structure" in values:
        return recipe_from_run(values)
    return Recipe.from_dict(values)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return path


def run_recipe(recipe: Recipe, *, progress: Callable | None = None, cancel=None) -> dict:
    """Replay a recipe end to end; returns the plan, the pruned (and fine-tuned) model and its metrics."""
    recipe.validate()
    model, dataset, arch = pipeline.resolve_model(recipe.model, data=recipe.data, data_file=recipe.data_file,
                                         seed=recipe.seed, use_baseline=recipe.baseline)
    prepared = pipeline.prepare(model, recipe.structure, recipe.criterion, dataset=dataset,
                                calib_batches=recipe.calib_batches, norm=recipe.norm, seed=recipe.seed)
    plan = pipeline.preview(prepared, recipe.sparsity, recipe.scope, overrides=recipe.overrides,
                            protect=recipe.protect, min_keep=recipe.min_keep)
    pruned = pipeline.apply(model, prepared, plan)
    history: list[dict] = []
    if recipe.finetune is not None and recipe.finetune.epochs > 0:
        result = train(pruned, dataset, recipe.finetune, progress=progress, cancel=cancel)
        pruned, history = result.model.cpu().eval(), result.history
    metrics = pipeline.measure_run(model, pruned, dataset, latency=recipe.measure_latency)
    return {"recipe": recipe.to_dict(), "plan": plan, "model": pruned, "arch": arch, "dataset": dataset,
            "metrics": metrics, "history": history}
