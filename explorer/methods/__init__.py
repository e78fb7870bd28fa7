"""Methods over training time: how pruning unfolds while the network trains (the third question).

Each method is a small class in this package (its docstring states the idea, the formula and
the paper) registered by name in `METHODS`; recipes name it in ``method: {name: NAME, ...its
parameters}`` and give the training budget in ``budget: {epochs: N}``. `run_method` runs one
on a start model with the shared training loop and returns the pruned model and its trajectory.

Example::

    outcome = run_method(recipe, model, dataset)
    outcome.model, outcome.trajectory[-1]["sparsity"]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.methods.at_init import AtInit
from explorer.methods.base import Method, MethodRun, collapsed_layers  # noqa: F401 - public API
from explorer.methods.during import SET, Gradual, RigL
from explorer.methods.one_shot import OneShot
from explorer.methods.regularised import LearnedMask, Penalty
from explorer.methods.rounds import Iterative, LotteryTicket, LrRewinding
from explorer.specs import build
from explorer.train import TrainConfig

METHODS: dict[str, Method] = {method.name: method for method in (OneShot(), Iterative(), LrRewinding(), LotteryTicket(), Gradual(), SET(), RigL(), AtInit(), Penalty(), LearnedMask())}


def method_params(name: str, params: dict):
    """The method's validated Params from the recipe's ``method`` keys (unknown keys refused)."""
    if name not in METHODS:
        raise ExplorerError(f"recipe: method.name '{name}' is not one of {', '.join(METHODS)}.")
    return build(METHODS[name].Params, "method", params)


@dataclass
class MethodOutcome:
    """A method's result: the pruned model, its trajectory and the plan of its last cut."""

    model: nn.Module
    trajectory: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    plan: object = None
    cancelled: bool = False


def run_method(recipe, model: nn.Module, dataset: Dataset, *, progress: Callable[[float, str], None] | None = None,
               cancel=None, on_point: Callable[[dict], None] | None = None) -> MethodOutcome:
    """Run the recipe's method on ``model`` (never changed) within the recipe's budget.

    The budget is ``budget.epochs`` if the recipe has one, else the fine-tune's epochs (0 when
    there is no fine-tune: prune only), counted as ``budget.view`` says (`BudgetSpec.epochs_for`):
    under ``counted`` a method from fresh weights also gets ``budget.start_epochs``; under ``fresh``
    a method that prunes a trained model first trains a fresh dense copy of ``model`` for half the
    budget (its epochs lead the trajectory at sparsity 0) and starts from that copy. Training
    settings (optimizer, learning rate, schedule, batch size) come from ``finetune`` (defaults otherwise).
    """
    method = METHODS[recipe.method.name]
    params = method_params(recipe.method.name, recipe.method.params)
    if recipe.scoring.structure not in method.structures:
        raise ExplorerError(f"Method '{method.name}' works with {' or '.join(method.structures)} structure, not "
                            f"'{recipe.scoring.structure}'; change the structure or the method.")
    dense_epochs, epochs = recipe.budget.epochs_for(method.from_scratch) if recipe.budget is not None else \
        (0, recipe.finetune.epochs if recipe.finetune else 0)
    if method.needs_training and epochs < 1:
        raise ExplorerError(f"Method '{method.name}' trains: give it a budget, e.g. budget: {{epochs: 8}}.")
    config = dataclasses.replace(recipe.finetune or TrainConfig(seed=recipe.seed), epochs=epochs)
    ctx = MethodRun(model=model, dataset=dataset, scoring=recipe.scoring, plan_spec=recipe.plan, config=config,
                    seed=recipe.seed, progress=progress, cancel=cancel, on_point=on_point)
    if dense_epochs:  # the fresh view: this method's start model is trained inside its budget
        ctx.model = ctx.train(ctx.fresh_model(), dense_epochs,
                              config=dataclasses.replace(config, epochs=dense_epochs)).model.eval()
    pruned = method.run(ctx, params)
    history = [{"epoch": p["epoch"], "loss": p["train_loss"], "val_accuracy": p["val_accuracy"],
                "metric": p["metric"], "val_metric": p["val_metric"]}
               for p in ctx.trajectory if p["event"] == "epoch"]
    return MethodOutcome(model=pruned.cpu().eval(), trajectory=ctx.trajectory, history=history,
                         plan=ctx.last_plan, cancelled=ctx.cancelled)
