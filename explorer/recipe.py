"""A Recipe is every choice of one pruning experiment as plain data, so it can be saved, compared and re-run.

It is the one description of an experiment: the Prune page keeps the session's Recipe and edits
it, the CLI builds one from its flags, every stored Run keeps its full Recipe, and `run_recipe`
replays it with the same core calls as the app, so the same seed gives the same numbers.
``python -m explorer run --recipe FILE`` is the CLI. The parts are the frozen, validated specs
of `explorer.specs`; ``Recipe.from_dict(run.recipe)`` rebuilds what a run stored.

Example ``recipe.yaml`` (every section optional except ``model``; a bare ``model: lenet5``
is short for ``model: {source: lenet5}``)::

    model: {source: lenet5, data: digits}      # zoo name (its trained baseline), a file or pkg.mod:callable
    scoring: {structure: channel, criterion: taylor, calib_batches: 4}
    plan: {sparsity: 0.5, scope: global, min_keep: 0.1}
    method: {name: one_shot}                   # a method's own parameters sit beside its name
    budget: {epochs: 2}                        # training the method may spend (default: finetune's epochs)
    finetune: {lr: 0.001}                      # training settings: optimizer, lr, schedule, batch size
    measure: {latency: true, batch: 64}       # runtimes: [eager, compile, onnxruntime] times each too
    seed: 0

Recipes written before these sections existed (flat keys such as ``structure:`` and
``sparsity:`` at the top, ``measure_latency:``) still load: `Recipe.from_dict` migrates them.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from explorer import limits, pipeline
from explorer.errors import ExplorerError, ExplorerWarning
from explorer.specs import BudgetSpec, MeasureSpec, MethodSpec, ModelSpec, PlanSpec, ScoringSpec, build
from explorer.layers import choose_device
from explorer.models import ZOO
from explorer.train import TrainConfig

_SECTIONS = {"model": ModelSpec, "scoring": ScoringSpec, "plan": PlanSpec, "method": MethodSpec,
             "measure": MeasureSpec}
# Where each key of the old flat recipe lives now.
_LEGACY_KEYS = {
    "data": ("model", "data"), "data_file": ("model", "data_file"), "baseline": ("model", "baseline"),
    "structure": ("scoring", "structure"), "criterion": ("scoring", "criterion"), "norm": ("scoring", "norm"),
    "calib_batches": ("scoring", "calib_batches"),
    "sparsity": ("plan", "sparsity"), "scope": ("plan", "scope"), "protect": ("plan", "protect"),
    "overrides": ("plan", "overrides"), "min_keep": ("plan", "min_keep"),
    "measure_latency": ("measure", "latency"),
}


@dataclass(frozen=True)
class Recipe:
    """What model, how to score, how much to prune, by which method, how to fine-tune and measure."""

    model: ModelSpec = field(default_factory=ModelSpec)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    plan: PlanSpec = field(default_factory=PlanSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    budget: BudgetSpec | None = None
    finetune: TrainConfig | None = None
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    seed: int = 0

    def validate(self) -> "Recipe":
        """Check every part; raise ExplorerError naming the first bad field and what is allowed."""
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ExplorerError(f"recipe: '{name}' must be a {cls.__name__}.")
            getattr(self, name).validate()
        if self.budget is not None and not isinstance(self.budget, BudgetSpec):
            raise ExplorerError("recipe: 'budget' must be a BudgetSpec.")
        if self.budget is not None:
            self.budget.validate()
        if self.finetune is not None:
            try:
                self.finetune.validate()
            except ExplorerError as exc:
                raise ExplorerError(f"recipe: finetune: {exc}") from exc
        try:
            limits.check_int("seed", self.seed, 0, limits.MAX_SEED)
        except ExplorerError as exc:
            raise ExplorerError(f"recipe: {exc}") from None
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (YAML / JSON-able); `from_dict` reads it back to an equal Recipe."""
        values = dataclasses.asdict(self)
        values["plan"]["protect"] = list(self.plan.protect)
        values["measure"]["runtimes"] = list(self.measure.runtimes)
        values["method"] = {"name": self.method.name, **self.method.params}  # method: {name: NAME, ...its params}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Recipe":
        """Build and validate a Recipe; unknown keys are refused, old flat recipes are migrated.

        A recipe is data, often someone else's (a downloaded ``run.yaml``), so it cannot turn on
        pickle loading: ``model.trust_pickle: true`` is ignored with an `ExplorerWarning`. Only the
        person running it can: ``run --trust-pickle`` or the app's checkbox (`Recipe.replace`).
        """
        if not isinstance(values, Mapping):
            raise ExplorerError("recipe: expected a mapping of settings (YAML or JSON object).")
        values = _without_trust(_migrate(dict(values)))
        method = values.get("method")
        if isinstance(method, Mapping) and "params" not in method:
            values["method"] = {"name": method.get("name", MethodSpec.name),
                                "params": {k: v for k, v in method.items() if k != "name"}}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ExplorerError(f"recipe: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}.")
        if "model" not in values:
            raise ExplorerError("recipe: 'model' is required: a zoo name, a model file or a package.module:callable.")
        parts = {name: build(spec, name, values.get(name)) for name, spec in _SECTIONS.items()}
        finetune = values.get("finetune")
        if finetune is not None:
            try:
                finetune = build(TrainConfig, "finetune", finetune)
            except ExplorerError as exc:
                raise ExplorerError(str(exc).replace("recipe: ", "recipe: fine-tune: ", 1)) from exc
        budget = build(BudgetSpec, "budget", values["budget"]) if values.get("budget") is not None else None
        return cls(**parts, budget=budget, finetune=finetune, seed=values.get("seed", 0)).validate()

    def replace(self, **parts) -> "Recipe":
        """A new Recipe with some parts swapped; a part given as a dict updates that part's fields."""
        changes = {}
        for name, value in parts.items():
            current = getattr(self, name)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                value = dataclasses.replace(current, **value)
            changes[name] = value
        return dataclasses.replace(self, **changes).validate()


def named_factories(recipe: Recipe) -> list[str]:
    """The ``package.module:callable`` factories a recipe would import and call (its model source or arch).

    Importing a module runs its code, and a recipe is often someone else's file: a downloaded run
    folder can carry ``evil.py`` beside a ``run.yaml`` naming ``evil:make``. `check_factories` refuses
    them unless the person running the recipe says they trust them.
    """
    named = []
    for value in (recipe.model.source, recipe.model.arch):
        if isinstance(value, str) and ":" in value and not value.startswith("hf:") and value not in ZOO \
                and not Path(value).exists():
            named.append(value)
    return named


def check_factories(recipe: Recipe, *, trusted: bool, flag: str = "--trust-factory") -> None:
    """Refuse a recipe that names a Python factory unless ``trusted`` (the user's flag, never the file's)."""
    named = named_factories(recipe)
    if named and not trusted:
        raise ExplorerError(f"The recipe names the Python factory {', '.join(repr(n) for n in named)}: importing it "
                            f"runs its code. If you trust it, pass {flag}; a recipe cannot allow it by itself.")


def _without_trust(values: dict) -> dict:
    """``values`` with ``model.trust_pickle`` off; a recipe that asked for it gets one warning line."""
    model = values.get("model")
    if not isinstance(model, Mapping) or "trust_pickle" not in model:
        return values
    if model["trust_pickle"] is not False:
        warnings.warn("the recipe's model.trust_pickle is ignored: a recipe or run file cannot allow pickled "
                      "models; pass --trust-pickle (or tick the app's 'I trust this file') if you trust the file.",
                      ExplorerWarning, stacklevel=3)
    return {**values, "model": {**model, "trust_pickle": False}}


def _migrate(values: dict) -> dict:
    """Old flat recipes (``model: mlp`` plus ``structure: ...`` at the top) to sections."""
    if isinstance(values.get("model"), str):
        values["model"] = {"source": values["model"]}
    legacy = [key for key in values if key in _LEGACY_KEYS]
    for key in legacy:
        section, name = _LEGACY_KEYS[key]
        target = values.setdefault(section, {})
        if not isinstance(target, dict):
            raise ExplorerError(f"recipe: '{key}' at the top level conflicts with the '{section}' section.")
        target[name] = values.pop(key)
    return values


def recipe_from_run(run: Mapping[str, Any]) -> Recipe:
    """The Recipe behind a stored run (a `store.Run.to_dict()` or a downloaded ``run.yaml``).

    Runs store their full Recipe; runs stored before that are rebuilt from their settings,
    which is possible for zoo models on built-in data only.
    """
    if run.get("recipe"):
        return Recipe.from_dict(run["recipe"])
    settings = run.get("settings") or {}
    arch = settings.get("arch")
    if settings.get("model_source", "zoo") != "zoo" or not arch or run.get("dataset") == "tensors":
        raise ExplorerError("Only runs of a zoo model on a built-in dataset can be replayed from their settings "
                            "(an uploaded file or a trained factory is not in the run); write a recipe that "
                            "points at the model file instead.")
    finetune = settings.get("finetune")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return Recipe(
        model=ModelSpec(source=arch, data=run.get("dataset"), baseline=True),
        scoring=ScoringSpec(structure=run["structure"], criterion=run["criterion"], norm=settings.get("norm", "l1"),
                            calib_batches=int(settings.get("calib_batches", 4))),
        plan=PlanSpec(sparsity=float(run["sparsity"]), scope=run["scope"], protect=tuple(settings.get("protect") or ()),
                      overrides=dict(settings.get("overrides") or {}), min_keep=float(settings.get("min_keep", 0.0))),
        finetune=TrainConfig(**{k: v for k, v in finetune.items() if k in train_fields}) if finetune else None,
        seed=int(settings.get("seed", 0)),
    ).validate()


MAX_YAML_BYTES = 1_000_000  # a recipe or grid is a few hundred bytes
MAX_YAML_DEPTH = 32         # sections nest two or three deep
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases (``*name``) and bounds nesting and the node count.

    A recipe is someone else's file: a few lines of aliases expand to gigabytes (the "billion
    laughs"), and thousands of nested brackets overflow Python's stack. Recipes never need either.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ExplorerError(f"line {mark.line + 1} uses a YAML alias (*name); recipes refuse aliases "
                                "(a few can expand to gigabytes): write the values out.")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise ExplorerError(f"it has more than {MAX_YAML_NODES:,} values; a recipe or grid is far smaller.")
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise ExplorerError(f"line {mark.line + 1} nests deeper than {MAX_YAML_DEPTH} levels; "
                                "recipes nest two or three.")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(path: str | Path, what: str = "Recipe") -> Any:
    """The data of a YAML or JSON file; a missing, oversized or unreadable file is one line naming ``what`` it is."""
    path = Path(path)
    if path.is_dir():
        raise ExplorerError(f"{what} file '{path}' is a folder; give the path of a YAML or JSON file.")
    if not path.is_file():
        raise ExplorerError(f"{what} file '{path}' does not exist.")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ExplorerError(f"{what} file '{path.name}' is {path.stat().st_size:,} bytes, more than "
                            f"{MAX_YAML_BYTES:,}; a {what.lower()} is a short YAML or JSON file.")
    try:
        return yaml.load(path.read_text(), Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except ExplorerError as exc:
        raise ExplorerError(f"'{path.name}' is refused: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ExplorerError(f"'{path.name}' is not valid YAML or JSON: {str(exc).splitlines()[0]}") from exc


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe (or a downloaded ``run.yaml`` / ``run.json``) from YAML or JSON."""
    values = read_yaml(path)
    if isinstance(values, Mapping) and "settings" in values and "structure" in values:
        return recipe_from_run(values)
    return Recipe.from_dict(values)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` as YAML (folders made as needed); a place that refuses the file is one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    except OSError as exc:
        raise ExplorerError(f"Cannot write the recipe to '{path}' ({exc.strerror or exc}); "
                            "choose another file.") from exc
    return path


def run_recipe(recipe: Recipe, *, progress: Callable[[float, str], None] | None = None, cancel=None,
               on_point: Callable[[dict], None] | None = None) -> dict:
    """Replay a recipe end to end: start model, method (prune, train) within the budget, measurement.

    Returns the recipe, the last plan, the pruned model, its metrics (with ``sparsity_actual``,
    the fraction of the start model's prunable weights that are gone), the training history, the
    method's trajectory and the layers it emptied.
    """
    from explorer.methods import collapsed_layers, run_method

    recipe.validate()
    if recipe.measure.device is not None:
        choose_device(recipe.measure.device)  # present here? before the model loads
    model, dataset, arch = pipeline.resolve_model(recipe.model, seed=recipe.seed)
    outcome = run_method(recipe, model, dataset, progress=progress, cancel=cancel, on_point=on_point)
    metrics = pipeline.measure_run(model, outcome.model, dataset, recipe.measure)
    return {"recipe": recipe.to_dict(), "plan": outcome.plan, "model": outcome.model, "arch": arch,
            "dataset": dataset, "metrics": metrics, "history": outcome.history, "trajectory": outcome.trajectory,
            "collapsed": collapsed_layers(outcome.model), "cancelled": outcome.cancelled}
