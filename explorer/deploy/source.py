"""The dense and pruned pair a deployment check compares: from a model file or a stored run.

``run:ID`` reads a run of the store (`explorer.store`): its pruned weights (saved with the run) and its
recipe, whose model section rebuilds the dense model and the dataset it was pruned on. A model file
written by Pruning Explorer (`models.save_model`: ``prune --save``, ``run --save``, the app's download)
carries its recipe too; a file without one gets its own architecture rebuilt at full width with
fresh weights as the dense reference (right for latency and FLOPs, which do not depend on the
values; the task metric of that dense copy is then meaningless and is left out).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from explorer import models, pipeline
from explorer.data import Dataset, load_dataset
from explorer.errors import ExplorerError
from explorer.recipe import Recipe
from explorer.zoo import ZOO


@dataclass
class Pair:
    """A pruned model, the dense model it came from, and the data to feed both."""

    dense: nn.Module
    pruned: nn.Module
    dataset: Dataset
    label: str
    dense_trained: bool  # False: the dense model has fresh weights (timing and FLOPs only, no task metric)
    note: str = ""

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return self.dataset.example_input(batch)


def load_pair(spec: str, *, trust_pickle: bool = False, store=None) -> Pair:
    """The pair named by ``spec``: ``run:ID`` (a stored run) or the path of a model file."""
    if spec.startswith("run:"):
        return _from_run(spec[4:], store)
    path = Path(spec)
    if not path.exists():
        raise ExplorerError(f"--model '{spec}': no such file; give a model file saved by Pruning Explorer "
                            "or run:ID for a stored run (python -m explorer prune ... --save FILE writes one).")
    try:
        saved = models.read_saved_metadata(path)
    except ExplorerError:
        raise ExplorerError(f"'{path.name}' was not saved by Pruning Explorer, so its dense model and data are "
                            "unknown; save the pruned model with `python -m explorer prune ... --save FILE` or "
                            "the app, or use run:ID.") from None
    recipe_values = (saved.get("metadata") or {}).get("recipe")
    if recipe_values:
        recipe = Recipe.from_dict(recipe_values)
        dense, dataset, _ = pipeline.resolve_model(recipe.model, seed=recipe.seed)
        pruned = models.load_model(path, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                                   trust_pickle=trust_pickle)
        return Pair(dense=dense, pruned=pruned.eval(), dataset=dataset, label=path.name, dense_trained=True)
    arch = models.saved_arch(saved["arch"], path)
    shape, classes = tuple(saved["input_shape"]), int(saved["num_classes"])
    dataset = _dataset_for(arch, shape)
    pruned = models.load_model(path, input_shape=shape, num_classes=classes)
    torch.manual_seed(0)
    dense = models.load_model(arch, input_shape=shape, num_classes=classes)
    return Pair(dense=dense.eval(), pruned=pruned.eval(), dataset=dataset, label=path.name, dense_trained=False,
                note=f"the file carries no recipe: the dense model is {arch} at full width with fresh weights "
                     "(latency and FLOPs only)")


def _from_run(text: str, store) -> Pair:
    from explorer.store import RunStore

    try:
        run_id = int(text)
    except ValueError:
        raise ExplorerError(f"run:{text}: give a run number, e.g. run:3 (python -m explorer run lists none; "
                            "the app's Compare page shows the numbers).") from None
    store = store or RunStore()
    run = store.get(run_id)
    weights = store.weights_path(run_id)
    if not weights.exists():
        raise ExplorerError(f"Run {run_id} has no stored weights ({weights} is missing), so there is no pruned "
                            "model to deploy; prune again in the app or with the CLI.")
    if not run.recipe:
        raise ExplorerError(f"Run {run_id} was stored without its recipe, so its dense model is unknown; "
                            "replay it with `python -m explorer run --recipe` and deploy the new run.")
    recipe = Recipe.from_dict(run.recipe)
    dense, dataset, _ = pipeline.resolve_model(recipe.model, seed=recipe.seed)
    pruned = models.load_model(weights, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    return Pair(dense=dense, pruned=pruned.eval(), dataset=dataset, label=run.name or f"run {run_id}",
                dense_trained=True)


def _dataset_for(arch: str, shape: tuple[int, ...]) -> Dataset:
    """The zoo model's usual dataset when its inputs fit ``shape``; otherwise digits if they do; else refuse."""
    for name in dict.fromkeys(([ZOO[arch].default_dataset] if arch in ZOO else []) + ["digits"]):
        dataset = load_dataset(name)
        if tuple(dataset.input_shape) == tuple(shape):
            return dataset
    raise ExplorerError(f"No built-in dataset gives inputs of shape {shape}; save the model with its recipe "
                        "(python -m explorer prune ... --save) so its data is known.")
