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

Beside the methods the lab runs the literature's controls (`CONTROLS`: a method with other
settings, such as the lottery ticket re-initialised at random), and `claims` checks each published
qualitative claim on the results that ran, from their own numbers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import nn

from explorer import pipeline
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.methods import METHODS, run_method
from explorer.store import Run, RunStore, StoreError
from explorer.train import TrainConfig


@dataclass(frozen=True)
class Control:
    """A method with other settings, run beside the methods as the control a published claim compares with.

    ``criterion`` replaces the lab's criterion; ``lr_scale`` and ``schedule`` change its training.
    """

    method: str
    params: dict = field(default_factory=dict)
    criterion: str | None = None
    lr_scale: float = 1.0
    schedule: str | None = None
    summary: str = ""


CONTROLS: dict[str, Control] = {
    "one_shot, fine-tune at lr/10 constant": Control(
        "one_shot", lr_scale=0.1, schedule="constant",
        summary="fine-tuning as Renda et al. compare it: a small constant learning rate"),
    "iterative, 6 rounds": Control("iterative", {"rounds": 6}, summary="more, smaller cuts"),
    "lottery_ticket, reinit control": Control(
        "lottery_ticket", {"reinit": True}, summary="the ticket's mask with fresh random weights"),
    "static random mask": Control(
        "at_init", criterion="random", summary="a random mask at the start, never changed (SET's and RigL's control)"),
    "synflow, iterative": Control("at_init", criterion="synflow", summary="SynFlow at init, 100 rounds"),
    "synflow, single shot": Control("at_init", {"rounds": 1}, criterion="synflow", summary="SynFlow at init, one cut"),
}


@dataclass(frozen=True)
class LabDefaults:
    """The Methods page's defaults: where every claim in `CLAIMS` held on the default model (mlp / digits)
    over three seeds, the start model's training counted (bench/RESULTS_methods.md, part ``claims``)."""

    sparsity: float = 0.95
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    view: str = "counted"


DEFAULTS = LabDefaults()
# A pretrained transformer judged by perplexity or fidelity: a short, cheap look (one epoch at half the weights),
# the methods that prune the start model (from fresh weights a transformer would need its pre-training again)
TASK_DEFAULTS = LabDefaults(sparsity=0.5, epochs=1, lr=1e-4, batch_size=32)
TASK_CHOSEN = ("one_shot", "gradual")


def defaults_for(task: str) -> LabDefaults:
    """The lab's defaults for a model judged by ``task`` (accuracy, perplexity or fidelity)."""
    return DEFAULTS if task == "accuracy" else TASK_DEFAULTS


def lab_recipe(recipe, name: str):
    """The recipe that runs ``name`` (a method with its defaults, or a control) in the lab's ``recipe``."""
    control = CONTROLS.get(name)
    if control is None:
        return recipe.replace(method={"name": name, "params": {}})
    changes = {"method": {"name": control.method, "params": dict(control.params)}}
    if control.criterion is not None:
        changes["scoring"] = dataclasses.replace(recipe.scoring, criterion=control.criterion)
    if control.lr_scale != 1.0 or control.schedule is not None:
        base = recipe.finetune or TrainConfig(seed=recipe.seed)
        changes["finetune"] = dataclasses.replace(base, lr=base.lr * control.lr_scale,
                                                  schedule=control.schedule or base.schedule)
    return recipe.replace(**changes)


def method_of(name: str) -> str:
    """The registered method a lab entry runs."""
    return CONTROLS[name].method if name in CONTROLS else name


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
        if name not in CONTROLS and name not in METHODS:
            result.error = f"{name}: not a method or control of the lab ({', '.join([*METHODS, *CONTROLS])})."
            continue
        method_recipe = lab_recipe(recipe, name)

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


def budget_text(budget, names: list[str]) -> str:
    """Which budget view a lab run shows, in numbers: who trained how many epochs, from what."""
    scratch = ", ".join(f"'{name}'" for name in names if METHODS[method_of(name)].from_scratch)
    trained = ", ".join(f"'{name}'" for name in names if not METHODS[method_of(name)].from_scratch)
    dense, method_epochs = budget.epochs_for(False)
    if budget.view == "fresh":
        text = f"Same budget from fresh weights: every method trained {budget.epochs} epochs in all, from fresh weights"
        return text + (f"; {trained} first trained a dense copy for {dense} of them, then pruned it and "
                       f"spent the other {method_epochs}." if trained else ".")
    if budget.start_epochs == 0:
        unequal = f"{trained} get more training than {scratch}, which start from fresh weights." \
            if trained and scratch else "methods that start from fresh weights get no more."
        return f"Every method trained {budget.epochs} epochs; the start model's own training is not counted, so {unequal}"
    total = budget.epochs + budget.start_epochs
    return (f"Counting the training that made the start model ({budget.start_epochs} epochs, RigL's accounting): "
            + (f"{trained} pruned it and trained {budget.epochs} more; " if trained else "")
            + (f"{scratch} trained {total} from fresh weights; " if scratch else "")
            + f"every result stands on {total} epochs of training.")


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
    head = f"{method} ended at chance: test accuracy {accuracy:.1%} (chance {1 / num_classes:.1%})"
    if not losses:
        return (f"{head}, and it was not trained after the cut: the cut left too little. Fine-tune it or lower the "
                "sparsity before reading its number.")
    return (f"{head}; the training loss ended at {losses[-1]:.2f} (ln {num_classes} = {math.log(num_classes):.2f}). "
            "Too small a budget to learn from where it started: give it more epochs before reading its number.")


@dataclass(frozen=True)
class Claim:
    """A published qualitative claim: each entry's test accuracy is at least (``strict``: above) the next one's."""

    text: str
    order: tuple[str, ...]
    source: str
    strict: bool = False


CLAIMS = (
    Claim("iterative pruning >= one-shot at high sparsity", ("iterative", "one_shot"), "Han et al. 2015"),
    Claim("iterative pruning (6 rounds) >= one-shot at high sparsity", ("iterative, 6 rounds", "one_shot"),
          "Han et al. 2015"),
    Claim("LR rewinding >= fine-tuning at a small constant LR",
          ("lr_rewinding", "one_shot, fine-tune at lr/10 constant"), "Renda et al. 2020"),
    Claim("lottery ticket > its random re-initialisation", ("lottery_ticket", "lottery_ticket, reinit control"),
          "Frankle & Carbin 2019", strict=True),
    Claim("RigL >= SET >= a static random mask at equal budget", ("rigl", "set", "static random mask"),
          "Evci et al. 2020"),
    Claim("iterative SynFlow keeps learning where single-shot SynFlow collapses",
          ("synflow, iterative", "synflow, single shot"), "Tanaka et al. 2020", strict=True),
)


def claims(accuracies: dict[str, float | None], errors: dict[str, str] | None = None,
           chance: float | None = None) -> list[dict]:
    """Each claim whose entries all ran, checked on ``accuracies`` (entry -> test accuracy).

    An entry that was refused (in ``errors``: a plan that empties a layer, say) counts as below any
    accuracy: single-shot SynFlow's collapse is what its claim is about. A claim whose first entry ended
    at ``chance`` (within 1.5 x, as `chance_note` reads it) is not shown to hold: a method that learned
    nothing beats nothing. Returns ``{claim, source, numbers, holds, verdict}`` rows; ``verdict`` is the
    sentence the page shows, computed from the numbers, never a canned one.
    """
    errors = errors or {}
    rows = []
    for claim in CLAIMS:
        if not all(accuracies.get(name) is not None or name in errors for name in claim.order) \
                or claim.order[0] in errors:
            continue
        values = [None if name in errors else accuracies[name] for name in claim.order]
        floor = [-1.0 if value is None else value for value in values]
        failed = [i for i in range(len(floor) - 1)
                  if floor[i] < floor[i + 1] or (claim.strict and floor[i] == floor[i + 1])]
        numbers = " vs ".join(f"{name} {'refused (a layer emptied)' if value is None else f'{value:.1%}'}"
                              for name, value in zip(claim.order, values))
        if chance is not None and floor[0] <= 1.5 * chance:
            verdict = (f"cannot tell from these runs: {numbers}; {claim.order[0]} ended at chance "
                       f"({chance:.0%}), too small a budget to learn")
            failed = [0]
        elif failed:
            first, second = claim.order[failed[0]], claim.order[failed[0] + 1]
            gap = 100 * (floor[failed[0] + 1] - floor[failed[0]])
            verdict = (f"does not hold in these runs: {numbers} ({first} "
                       f"{f'{gap:.1f} points below' if gap else 'no better than'} {second})")
        else:
            verdict = f"holds in these runs: {numbers}"
        rows.append({"claim": claim.text, "source": claim.source, "numbers": numbers, "holds": not failed,
                     "verdict": verdict})
    return rows
