"""The methods lab: several methods on one model, one after the other, under one budget.

Every method gets the same start model, the same structure, criterion, scope, target sparsity,
training settings and budget (the recipe), so their curves and final numbers compare at equal
cost. Each finished method is measured with the same call as every other run and, given a
store, saved as a Run carrying its recipe and trajectory. Meant to run in a background job
(`explorer.jobs`): progress and live trajectory points go to the job's context, a cancel stops
the method in flight (its partial trajectory is kept and measured) and skips the rest, and a
method that fails (a diverging loss, a structure it cannot serve) is reported and the next runs.
A run the store refuses is no failure of its method: the result stays, its ``error`` names the
file that keeps the run instead (`explorer.store.RunStore.save`), and the next method runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from explorer import pipeline
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.methods import run_method
from explorer.store import Run, RunStore, StoreError


@dataclass
class LabResult:
    """One method's outcome in the lab: its pruned model, metrics and trajectory, or the one line that says why not.

    ``error`` with ``metrics`` set is a run the store refused: ``kept`` is the file that holds it (or None).
    """

    method: str
    trajectory: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    run_id: int | None = None
    cancelled: bool = False
    error: str | None = None
    model: nn.Module | None = None
    kept: str | None = None


def run_lab(recipe, names: list[str], model: nn.Module, dataset: Dataset, *, context=None,
            store: RunStore | None = None, model_name: str = "", settings: dict | None = None,
            base_accuracy: float | None = None) -> list[LabResult]:
    """Run ``names`` one after the other with ``recipe``'s everything-but-the-method; ``model`` is never changed.

    ``context`` is an `explorer.jobs.JobContext` (progress, live points under the method's name in
    the payload, cancel) or None. With a ``store`` each finished method is saved as a Run.
    """
    if not names:
        raise ExplorerError("Pick at least one method to run.")
    results: list[LabResult] = []
    for index, name in enumerate(names):
        if context is not None and context.cancelled:
            break
        result = LabResult(method=name)
        results.append(result)
        method_recipe = recipe.replace(method={"name": name, "params": {}})

        def report(fraction: float, text: str, index=index, name=name) -> None:
            if context is not None:
                context.report((index + fraction) / len(names), f"{name} ({index + 1}/{len(names)}): {text}")

        def point(value: dict, name=name, result=result) -> None:
            result.trajectory.append(value)
            if context is not None:
                context.append(name, value)

        try:
            outcome = run_method(method_recipe, model, dataset, progress=report,
                                 cancel=context.cancel if context is not None else None, on_point=point)
            result.cancelled, result.model = outcome.cancelled, outcome.model
            result.metrics = pipeline.measure_run(model, outcome.model, dataset, method_recipe.measure,
                                                  base_accuracy=base_accuracy)
        except ExplorerError as exc:
            result.error = f"{name}: {exc}"
            continue
        if store is not None:
            run = Run.from_recipe(method_recipe, model_name=model_name, dataset=dataset.name,
                                  settings={**(settings or {}), "cancelled": result.cancelled},
                                  metrics=result.metrics, history=outcome.history, trajectory=result.trajectory)
            try:
                result.run_id = store.save(run, outcome.model if (settings or {}).get("arch") else None).id
            except StoreError as exc:  # measured and kept in a file: the method's result stands, the next runs
                result.run_id = run.id  # set when the run is stored and only its weights were refused
                result.kept = str(exc.kept) if exc.kept is not None else None
                result.error = f"{name}: {exc}"
    return results


def chance_note(method: str, metrics: dict | None, trajectory: list[dict], num_classes: int) -> str | None:
    """One line when a method's result sits at chance, so its number is not read as the method's verdict.

    A classifier that learned nothing scores about 1 / classes and its cross-entropy stays near
    ln(classes) (2.30 for 10 classes): the budget was too small for where the method started (fresh
    weights, or a cut that left too little). None when the accuracy is above 1.5 x chance or unknown.
    """
    accuracy = (metrics or {}).get("accuracy")
    if accuracy is None or num_classes < 2 or accuracy > 1.5 / num_classes:
        return None
    losses = [point["train_loss"] for point in trajectory if point.get("train_loss") is not None]
    loss = f"; the training loss ended at {losses[-1]:.2f} (ln {num_classes} = {math.log(num_classes):.2f})" \
        if losses else ""
    return (f"{method} ended at chance: test accuracy {accuracy:.1%} (chance {1 / num_classes:.1%}){loss}. "
            "Too small a budget to learn from where it started: give it more epochs before reading its number.")
