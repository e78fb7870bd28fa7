"""The evidence behind the tour: each question of pruning answered by a computation on the spot.

The Tour page calls these on the session's model; each returns plain data that a figure in
`explorer.figures` draws. Nothing here is a claim written down in advance: run them on another
model and the numbers (and sometimes the lesson's strength) change.

* `what_to_prune` - the same model pruned unstructured and by channels: FLOPs speed-up, measured
  speed-up and compressed file size side by side, and one coupled group's real vs naive cost;
* `how_to_decide` - criteria compared at one sparsity (the task metric right after the cut: accuracy,
  or a transformer's perplexity / fidelity), and the
  same sparsity planned in local and in global scope, at a criterion and sparsity chosen from the
  model's own collapse points so that global empties a layer and local does not (`collapse_demo`);
* `how_over_time` - methods run under one small budget, their trajectories side by side.
"""
from __future__ import annotations

import math

from torch import nn

from explorer import criteria, pipeline, tasks
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.specs import MeasureSpec, PlanSpec, ScoringSpec
from explorer.train import evaluate


def what_to_prune(model: nn.Module, dataset: Dataset, *, unstructured: float = 0.9, channel: float = 0.5,
                  measure: MeasureSpec = MeasureSpec(min_run_time=0.3)) -> dict:
    """Unstructured at ``unstructured`` and channel at ``channel`` sparsity (magnitude, local), measured alike.

    A transformer is also pruned by attention heads at ``channel`` (where `pipeline.prepare` accepts it).
    Returns ``rows`` (label, speedup_flops, speedup_measured with its ``speedup_interval``,
    ``speedup_noisy`` and ``speedup_noise``, compression_ratio, accuracy, and ``task``: the task
    metric's name, measure, base and pruned value, as `pipeline.measure_run` gives it) and the
    model's first channel group with the most coupled members (``group``: name, kind, real and naive
    parameters per channel), or None when the model has no removable channels.
    """
    rows, group = [], None
    structures = [("unstructured", unstructured), ("channel", channel)]
    if tasks.model_task(model) is not None:  # a transformer: whole attention heads too
        structures.append(("head", channel))
    for structure, sparsity in structures:
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
                     "base_accuracy": metrics["base_accuracy"], "task": metrics["task"]})
        if structure == "channel" and prepared.groups:
            chosen = max(prepared.groups, key=lambda g: (len(g.members), g.params_per_channel_real))
            group = {"name": chosen.name, "kind": chosen.kind, "members": [m.layer for m in chosen.members],
                     "real": chosen.params_per_channel_real, "naive": chosen.params_per_channel_naive}
    return {"rows": rows, "group": group}


def how_to_decide(model: nn.Module, dataset: Dataset, *, sparsity: float = 0.8,
                  names: tuple[str, ...] = ("magnitude", "gradient", "taylor", "snip", "random")) -> dict:
    """The task metric right after an unstructured global cut at ``sparsity`` per criterion, and the
    scope demo: one plan per scope at a sparsity where global scope has emptied a layer and local
    has not (`collapse_demo`, chosen from this model's computed collapse points).

    ``task``: name, measure, higher_is_better, ``base`` (the dense model's value) and ``values``
    (criterion -> value, None where the plan empties a layer); for a model judged by accuracy
    ``accuracy`` / ``base_accuracy`` hold the same numbers. ``refused``: criterion -> the one line
    `pipeline.prepare` refused it with for this model (left out of the comparison).
    """
    task_name = tasks.task_for(model, dataset)
    values, prepared, refused = {}, {}, {}

    def score(candidate: nn.Module) -> dict:
        if task_name == "accuracy":
            value = evaluate(candidate, dataset)["accuracy"]
            return {"name": "accuracy", "measure": "accuracy", "higher_is_better": True, "value": value}
        return tasks.evaluate_task(candidate, dataset, reference=model, task=task_name,
                                   max_tokens=MeasureSpec().token_budget)  # a perplexity on q1's tokens

    for name in names:
        if name not in criteria.CRITERIA:
            raise ExplorerError(f"Unknown criterion '{name}': use one of {', '.join(criteria.CRITERIA)}.")
        try:
            prepared[name] = pipeline.prepare(model, ScoringSpec("unstructured", name, calib_batches=2),
                                              dataset=dataset)
        except ExplorerError as exc:
            refused[name] = str(exc)
            continue
        plan = pipeline.preview(prepared[name], PlanSpec(sparsity, "global"))
        values[name] = None if plan.collapsed else score(pipeline.apply(model, prepared[name], plan))["value"]
    if not prepared:
        raise ExplorerError("No criterion could score this model: " + " ".join(refused.values()))
    base = score(model)
    task = {"name": base["name"], "measure": base["measure"], "higher_is_better": base["higher_is_better"],
            "base": base["value"], "values": values}
    by_accuracy = task_name == "accuracy"
    return {"sparsity": sparsity, "accuracy": values if by_accuracy else None,
            "base_accuracy": base["value"] if by_accuracy else None, "task": task, "refused": refused,
            **collapse_demo({name: p for name, p in prepared.items() if name != "random"} or prepared)}


def collapse_demo(prepared: dict[str, pipeline.Prepared], *, fallback: float = 0.95) -> dict:
    """The criterion and sparsity at which global scope empties a layer and local scope does not.

    Local scope empties its smallest layer (``n`` units) only at ``1 - 0.5 / n``, the same for every
    criterion; global scope empties a layer at the criterion's own collapse point, which on a trained
    model can come late (magnitude on lenet5: beyond 99.8 %, after local). Of the criteria whose global
    collapse comes first, the one with the widest gap is shown, midway through it. ``points`` holds
    every criterion's (global, local) collapse points; ``shown`` is False when no criterion collapses
    globally before locally, and ``plans`` are then at ``fallback`` with magnitude (or the first given).
    """
    points = {}
    for name, ready in prepared.items():
        points[name] = tuple(pipeline.preview(ready, PlanSpec(0.5, scope)).collapse_point
                             for scope in ("global", "local"))
    gaps = {name: local - glob for name, (glob, local) in points.items()
            if glob is not None and local is not None and local > glob}
    if gaps:
        criterion = max(gaps, key=gaps.get)
        glob, local = points[criterion]
        middle = (glob + local) / 2
        sparsity = math.floor(middle * 1000) / 1000  # a readable step, if it stays inside the gap
        sparsity = sparsity if sparsity > glob else middle
    else:
        criterion = "magnitude" if "magnitude" in prepared else next(iter(prepared))
        sparsity = fallback
    plans = {scope: pipeline.preview(prepared[criterion], PlanSpec(sparsity, scope)) for scope in ("local", "global")}
    return {"collapse_criterion": criterion, "collapse_sparsity": sparsity, "collapse_points": points,
            "collapse_shown": bool(gaps), "plans": plans}


def collapse_percent(point: float) -> str:
    """A collapse point rounded down to a tenth of a percent: 0.9996 reads '99.9%' (the sparsity from which the
    layer is empty), never '100.0%', which would say it empties only beyond everything."""
    return f"{math.floor(1000 * point + 1e-9) / 10:.1f}%"


def collapse_demo_text(demo: dict) -> str:
    """What the scope demo shows and why this criterion and sparsity, from the computed collapse points."""
    points, criterion, sparsity = demo["collapse_points"], demo["collapse_criterion"], demo["collapse_sparsity"]
    listed = ", ".join(f"{name} {collapse_percent(glob)}" for name, (glob, _) in points.items() if glob is not None)
    local = next((local for _, local in points.values() if local is not None), None)
    local_text = f"local scope empties its smallest layer only from {collapse_percent(local)} on" \
        if local is not None else "local scope empties no layer"
    if demo["collapse_shown"]:
        return (f"Where global scope first empties a layer, per criterion: {listed}; {local_text}. "
                f"Shown: **{criterion} at {sparsity:.1%}**, where global has emptied a layer and local has not.")
    return (f"On this model no criterion makes global scope empty a layer before local scope does "
            f"(global: {listed or 'never'}; {local_text}), so both are shown with {criterion} at {sparsity:.1%}.")


def how_over_time(recipe, model: nn.Module, dataset: Dataset, names: tuple[str, ...] = ("one_shot", "iterative"),
                  *, context=None) -> dict:
    """``names`` run under ``recipe``'s budget (see `explorer.methods.lab.run_lab`): name -> trajectory and metrics."""
    from explorer.methods import METHODS
    from explorer.methods.lab import CONTROLS, run_lab

    results = run_lab(recipe, [n for n in names if n in METHODS or n in CONTROLS], model, dataset, context=context)
    return {r.method: {"trajectory": r.trajectory, "metrics": r.metrics, "error": r.error} for r in results}


def _task_text(task: dict | None):
    """How question 3 reads a run's value, shows it, and says a difference, for ``task`` (None: accuracy)."""
    if task is None or task.get("name", "accuracy") == "accuracy":
        return (lambda m: m["accuracy"], lambda v: f"{v:.1%}", lambda d: f"{100 * d:+.1f} points", True)
    measure = task.get("measure") or task["name"]
    if measure == "top1":
        show, say = (lambda v: f"{v:.1%} top-1 agreement"), (lambda d: f"{100 * d:+.1f} points")
    elif measure == "perplexity":
        show, say = (lambda v: f"perplexity {v:,.2f}"), (lambda d: f"{d:+,.2f}")
    else:
        show, say = (lambda v: f"{measure} {v:.3f}"), (lambda d: f"{d:+.3f}")
    better = task.get("higher_is_better", tasks.HIGHER_IS_BETTER.get(measure, True))
    return (lambda m: m["task"]["pruned"]), show, say, better


def over_time_text(results: dict, epochs: int, rounds: int, sparsity: float, task: dict | None = None) -> str | None:
    """What question 3's runs show, from their numbers: did cutting in ``rounds`` beat one cut, and why (not)?

    Both methods spend ``epochs``; the rounds split them evenly (`explorer.methods.rounds.split_budget`),
    so the last cut has only a share of the budget to recover while the single cut has all of it. Rounds
    win where one cut removes too much at once for the fine-tune to repair (high sparsity), lose where it
    does not. ``task`` (the model's, with ``name``, ``measure`` and ``higher_is_better``; None: accuracy)
    says which number to compare and which direction is better: a lower perplexity wins. None unless both ran.
    """
    from explorer.methods.rounds import split_budget

    names = [name for name in results if results[name].get("metrics")]
    once = next((n for n in names if n == "one_shot"), None)
    rounds_name = next((n for n in names if n != "one_shot"), None)
    if once is None or rounds_name is None:
        return None
    value, show, say, higher_is_better = _task_text(task)
    single, stepped = (value(results[n]["metrics"]) for n in (once, rounds_name))
    last = split_budget(epochs, rounds)[-1]
    if task is None or task.get("name", "accuracy") == "accuracy":
        gap = 100 * (stepped - single)
        if gap >= 0:
            return (f"Here the rounds helped: {rounds} cuts to {sparsity:.0%} end at {stepped:.1%} against "
                    f"{single:.1%} for one cut ({gap:+.1f} points), although the last cut had only {last} of the "
                    f"{epochs} epochs to recover: each cut removed less, and training between cuts let the remaining "
                    "weights take over the work of the removed ones.")
        return (f"Here the rounds did not help: {rounds} cuts to {sparsity:.0%} end at {stepped:.1%} against {single:.1%} "
                f"for one cut ({gap:+.1f} points). One cut had all {epochs} epochs to recover, the last of the rounds "
                f"only {last}; on this model one cut to {sparsity:.0%} loses little that a long fine-tune cannot repair, "
                "so the longer recovery wins. Rounds pay where one cut removes too much at once: raise the sparsity.")
    direction = "higher" if higher_is_better else "lower"
    way = "raising the sparsity gradually while training" if rounds_name == "gradual" else f"{rounds} cuts"
    head = (f"{way} to {sparsity:.0%} ends at {show(stepped)} against {show(single)} for one cut "
            f"({say(stepped - single)}; {direction} is better)")
    if (stepped >= single) if higher_is_better else (stepped <= single):
        return (f"Here stepping helped: {head}, from the same {epochs}-epoch budget: each step removed less, and "
                "training between steps let the remaining weights take over the work of the removed ones.")
    return (f"Here stepping did not help: {head}. One cut had all {epochs} epochs to recover; on this model one cut "
            f"to {sparsity:.0%} loses little that the fine-tune cannot repair. Steps pay where one cut removes too "
            "much at once: raise the sparsity.")
