"""The evidence behind the tour: each question of pruning answered by a computation on the spot.

The Tour page calls these on the session's model; each returns plain data that a figure in
`explorer.figures` draws. Nothing here is a claim written down in advance: run them on another
model and the numbers (and sometimes the lesson's strength) change.

* `what_to_prune` - the same model pruned unstructured and by channels: FLOPs speed-up, measured
  speed-up and compressed file size side by side, and one coupled group's real vs naive cost;
* `how_to_decide` - criteria compared at one sparsity (accuracy right after the cut), and the
  same sparsity planned in local and in global scope with their collapse points;
* `how_over_time` - methods run under one small budget, their trajectories side by side.
"""
from __future__ import annotations

from torch import nn

from explorer import criteria, pipeline
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.specs import MeasureSpec, PlanSpec, ScoringSpec
from explorer.train import evaluate


def what_to_prune(model: nn.Module, dataset: Dataset, *, unstructured: float = 0.9, channel: float = 0.5,
                  measure: MeasureSpec = MeasureSpec(min_run_time=0.3)) -> dict:
    """Unstructured at ``unstructured`` and channel at ``channel`` sparsity (magnitude, local), measured alike.

    Returns ``rows`` (label, speedup_flops, speedup_measured with its ``speedup_interval``,
    ``speedup_noisy`` and ``speedup_noise``, compression_ratio, accuracy) and the
    model's first channel group with the most coupled members (``group``: name, kind, real and naive
    parameters per channel), or None when the model has no removable channels.
    """
    rows, group = [], None
    for structure, sparsity in (("unstructured", unstructured), ("channel", channel)):
        try:
            prepared = pipeline.prepare(model, ScoringSpec(structure, "magnitude"), dataset=dataset)
        except ExplorerError:
            continue
        pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity, "local")))
        metrics = pipeline.measure_run(model, pruned, dataset, measure)
        rows.append({"label": f"{structure} {sparsity:.0%}", "structure": structure, "sparsity": sparsity,
                     "speedup_flops": metrics["speedup_flops"], "speedup_measured": metrics["speedup_measured"],
                     "speedup_interval": metrics["speedup_interval"], "speedup_noisy": metrics["speedup_noisy"],
                     "speedup_noise": metrics["speedup_noise"], "timing": metrics["timing"],
                     "compression_ratio": metrics["compression_ratio"], "accuracy": metrics["accuracy"],
                     "base_accuracy": metrics["base_accuracy"]})
        if structure == "channel" and prepared.groups:
            chosen = max(prepared.groups, key=lambda g: (len(g.members), g.params_per_channel_real))
            group = {"name": chosen.name, "kind": chosen.kind, "members": [m.layer for m in chosen.members],
                     "real": chosen.params_per_channel_real, "naive": chosen.params_per_channel_naive}
    return {"rows": rows, "group": group}


def how_to_decide(model: nn.Module, dataset: Dataset, *, sparsity: float = 0.8,
                  names: tuple[str, ...] = ("magnitude", "taylor", "snip", "random"),
                  collapse_sparsity: float = 0.95) -> dict:
    """Test accuracy right after an unstructured global cut at ``sparsity`` per criterion, and one plan
    at ``collapse_sparsity`` in each scope (magnitude) with its collapse point."""
    accuracy = {}
    for name in names:
        if name not in criteria.CRITERIA:
            raise ExplorerError(f"Unknown criterion '{name}': use one of {', '.join(criteria.CRITERIA)}.")
        prepared = pipeline.prepare(model, ScoringSpec("unstructured", name, calib_batches=2), dataset=dataset)
        plan = pipeline.preview(prepared, PlanSpec(sparsity, "global"))
        accuracy[name] = None if plan.collapsed else evaluate(pipeline.apply(model, prepared, plan), dataset)["accuracy"]
    magnitude = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude"), dataset=dataset)
    plans = {scope: pipeline.preview(magnitude, PlanSpec(collapse_sparsity, scope)) for scope in ("local", "global")}
    return {"sparsity": sparsity, "accuracy": accuracy, "base_accuracy": evaluate(model, dataset)["accuracy"],
            "plans": plans}


def how_over_time(recipe, model: nn.Module, dataset: Dataset, names: tuple[str, ...] = ("one_shot", "iterative"),
                  *, context=None) -> dict:
    """``names`` run under ``recipe``'s budget (see `explorer.methods.lab.run_lab`): name -> trajectory and metrics."""
    from explorer.methods import METHODS
    from explorer.methods.lab import run_lab

    results = run_lab(recipe, [n for n in names if n in METHODS], model, dataset, context=context)
    return {r.method: {"trajectory": r.trajectory, "metrics": r.metrics, "error": r.error} for r in results}
