"""Suggested recipe: per-unit sparsities chosen from a sensitivity scan to meet one goal.

A scan (`explorer.sensitivity`) says what each unit — a layer, or a coupled channel group — costs
when it alone is pruned to each sparsity of a grid. `suggest` picks one grid sparsity (or 0) per unit:

* **goal**: a largest acceptable metric drop (``max_drop``: remove as many weights as possible
  while the predicted drop stays within it), a target overall sparsity (``target_sparsity``: reach
  it with the smallest predicted drop) or a target FLOPs reduction (``target_flops``: the fraction of
  the dense model's FLOPs per input to remove, ``scan.flops_dense``; the greedy then weighs each step's
  drop against the FLOPs it saves instead of the weights). FLOPs are theoretical: for unstructured
  masks they are the multiply-adds of the non-zero weights, which dense kernels still compute (only
  channel and head removal turn them into measured time). A latency goal is not offered: a unit's
  measured saving is too noisy on a shared CPU to add up.
* **overall sparsity** is weights-weighted: the fraction of the prunable layers' weights that go,
  ``sum(cell.params_saved) / scan.params_prunable``. For unstructured pruning ``params_saved`` is the
  unit's pruned weights, so this is exact. For channel groups a cell's count is `pipeline.estimate`'s of
  the weights the group's channels take with them alone; two groups that share a layer (one's filters are
  the other's input columns) would both be credited with that layer's corner, so given ``prepared`` (the
  scan's scores; the CLI passes them) `suggest` counts the whole choice with `pipeline.estimate` instead,
  which matches the sparsity measured after applying. Without it the sum runs high (resnet20 / shapes:
  50 % predicted, 43.6 % measured).
* **additivity**: the predicted drop is the *sum* of the units' drops measured alone. It assumes the
  units do not interact; they do (a pruned layer changes what the next one sees, errors compound, and
  sometimes cancel), which is why `evaluate` applies the whole suggestion and reports the actual drop.
* **greedy**: start dense; repeatedly take the step — one unit moved to any higher sparsity of its row —
  with the smallest extra drop per extra weight removed (ties: the larger step, then model order). Each
  row's drop is first made a running maximum from the dense point (0 drop): scans are noisy and not
  monotone, a unit pruned further never counts as better than less, and an improvement counts as no drop.
  Allowing a jump over several grid points lets the greedy cross a bump of a non-convex row. On convex
  rows this is the merge of the rows' segments by slope, which gives the least total drop for the
  sparsity reached at every step (tested against brute force). ``max_drop`` skips steps that would
  exceed it and stops when none fits; ``target_sparsity`` stops once reached, then moves units back
  down while the target still holds and the drop does not grow (grid steps are coarse, so the reached
  sparsity can still overshoot: the note says).
* A collapsed cell (the unit emptied) cannot be applied, so it is never chosen.

Example::

    result = sensitivity.scan(model, dataset, ScoringSpec(), samples=512, prepared=prepared)
    suggestion = suggest(result, target_sparsity=0.8, prepared=prepared)
    suggestion = evaluate(model, dataset, prepared, suggestion, samples=512)
    suggestion.predicted["drop"], suggestion.actual["drop"], suggestion.recipe(base).plan.overrides
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from explorer import pipeline, tasks
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.layers import prunable_counts
from explorer.recipe import Recipe
from explorer.sensitivity import Scan, validation_subset
from explorer.specs import PlanSpec

_TOLERANCE = 1e-12


@dataclass
class Suggestion:
    """Per-unit sparsities for a goal, the result the scan predicts and (after `evaluate`) the actual one.

    ``predicted`` and ``actual`` hold ``{value, drop, sparsity, flops_saved}``: the task metric, its drop
    from the dense model (larger is worse whatever the metric), the overall sparsity (module doc) and the
    FLOPs saved per input. ``base``, ``metric``, ``measure``, ``higher_is_better``, ``split`` and
    ``samples`` are the scan's: the predicted value is for that subset, and so is ``actual`` when
    `evaluate` is called with the same split and samples.
    """

    goal: dict
    sparsities: dict[str, float]
    predicted: dict
    actual: dict | None = None
    note: str = ""
    base: float = 0.0
    metric: str = ""
    measure: str = ""
    higher_is_better: bool = True
    split: str = "val"
    samples: int | None = None
    structure: str = "unstructured"
    criterion: str = "magnitude"
    grid_note: str = ""  # what the greedy could not do exactly (a coarse grid overshooting the target)

    def to_dict(self) -> dict:
        """Plain data (``json.dumps`` works on it)."""
        return dataclasses.asdict(self)

    def plan_spec(self) -> PlanSpec:
        """Local scope with every unit's sparsity as an override: the plan that replays the suggestion.

        Every scanned unit is overridden (0.0 included), so the plan's own ``sparsity`` prunes nothing
        more; it holds the predicted overall sparsity for the reader.
        """
        return PlanSpec(sparsity=round(float(self.predicted["sparsity"]), 6), scope="local",
                        overrides=dict(self.sparsities)).validate()

    def recipe(self, base: Recipe) -> Recipe:
        """``base`` (model, scoring, method, measurement, seed) with the suggestion as its plan."""
        if (base.scoring.structure, base.scoring.criterion) != (self.structure, self.criterion):
            raise ExplorerError(f"The recipe scores {base.scoring.structure} / {base.scoring.criterion}, the "
                                f"suggestion was scanned with {self.structure} / {self.criterion}: "
                                "use the scan's scoring.")
        return base.replace(plan=self.plan_spec())


@dataclass
class _Option:
    """One grid point of a unit's row: what choosing it costs (running-max drop) and saves."""

    sparsity: float
    drop: float
    params_saved: int
    flops_saved: int


@dataclass
class _Row:
    unit: str
    options: list[_Option] = field(default_factory=list)
    chosen: int = 0


def check_goal(max_drop: float | None, target_sparsity: float | None, target_flops: float | None = None) -> dict:
    """The goal as ``{"max_drop": x}``, ``{"target_sparsity": s}`` or ``{"target_flops": f}``: exactly one,
    drop >= 0, s and f in [0, 1)."""
    given = {name: value for name, value in (("max_drop", max_drop), ("target_sparsity", target_sparsity),
                                             ("target_flops", target_flops)) if value is not None}
    if len(given) != 1:
        raise ExplorerError("Give exactly one goal: a largest acceptable drop (max_drop), a target overall "
                            "sparsity (target_sparsity) or a target FLOPs reduction (target_flops).")
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ExplorerError(f"{name} must be a number, got {value!r}.")
    if name == "max_drop" and value < 0:
        raise ExplorerError(f"max_drop {value:g} is negative: the largest acceptable drop is 0 or more "
                            "(0 keeps only what costs nothing).")
    if name == "target_flops" and not 0.0 <= value < 1.0:
        raise ExplorerError(f"target_flops {value:g} is outside [0, 1): it is the fraction of the dense model's "
                            "FLOPs per input to remove.")
    if name == "target_sparsity" and not 0.0 <= value < 1.0:
        raise ExplorerError(f"target_sparsity {value:g} is outside [0, 1): it is the fraction of the prunable "
                            "weights to remove.")
    return {name: float(value)}


def _rows(scan: Scan) -> list[_Row]:
    """Each unit's options: dense, then its grid cells up to the first collapsed or valueless one,
    with the drop made a running maximum from 0 (module doc)."""
    rows = []
    for unit in scan.units:
        row = _Row(unit, [_Option(0.0, 0.0, 0, 0)])
        worst = 0.0
        for cell in sorted(scan.row(unit), key=lambda c: c.sparsity):
            if cell.collapsed or cell.drop is None or math.isnan(cell.drop):
                break
            worst = max(worst, float(cell.drop))
            row.options.append(_Option(cell.sparsity, worst, int(cell.params_saved), int(cell.flops_saved)))
        rows.append(row)
    return rows


def _weights_total(scan: Scan) -> int:
    """What an overall sparsity is a fraction of: the scan's prunable weights (older scans: the units' sizes)."""
    if scan.params_prunable:
        return int(scan.params_prunable)
    if scan.structure == "unstructured":
        return sum(max(cell.total for cell in scan.row(unit)) for unit in scan.units if scan.row(unit))
    total = 0  # channel groups: the weights a whole group takes, extrapolated from its cells (params ~ channels)
    for unit in scan.units:
        sizes = [cell.params_saved * cell.total / cell.pruned for cell in scan.row(unit) if cell.pruned]
        total += int(round(max(sizes))) if sizes else 0
    return total


def _check_scan(scan: Scan) -> None:
    if not isinstance(scan, Scan):
        raise ExplorerError(f"suggest needs a sensitivity Scan, got {type(scan).__name__}.")
    if scan.cancelled:
        raise ExplorerError("The scan was cancelled: finish it (every unit at every sparsity) before asking "
                            "for a suggestion.")
    complete = {unit for unit in scan.units if len(scan.row(unit)) == len(scan.sparsities)}
    if not scan.cells or not scan.units or complete != set(scan.units):
        raise ExplorerError("The scan has no complete rows: run it over every unit before asking for a suggestion.")


class _Ledger:
    """Weights and FLOPs (per input) that a choice of grid points removes.

    By default the cells' ``params_saved`` / ``flops_saved`` are added. With ``prepared`` (the scan's
    scores) and channel structure, `pipeline.estimate` counts the whole plan instead: a layer that is one
    group's filters and another's input columns loses ``1 - kept_out * kept_in`` of its weights, not the
    sum of both cells' savings, so each step is credited with what it adds to the choice so far.
    """

    def __init__(self, rows: list[_Row], prepared: pipeline.Prepared | None):
        self.rows = rows
        self.prepared = prepared if prepared is not None and prepared.structure == "channel" else None
        self.cache: dict[tuple[int, ...], tuple[int, int]] = {}

    def saved(self, choice: tuple[int, ...]) -> tuple[int, int]:
        if self.prepared is None:
            options = [row.options[index] for row, index in zip(self.rows, choice)]
            return sum(o.params_saved for o in options), sum(o.flops_saved for o in options)
        if choice not in self.cache:
            overrides = {row.unit: row.options[index].sparsity for row, index in zip(self.rows, choice)}
            estimate = pipeline.estimate(self.prepared, pipeline.preview(
                self.prepared, PlanSpec(sparsity=0.0, scope="local", overrides=overrides)))
            self.cache[choice] = (estimate["params_total"] - estimate["params_after"],
                                  estimate["flops_dense"] - estimate["flops_after"])
        return self.cache[choice]

    def now(self) -> tuple[int, ...]:
        return tuple(row.chosen for row in self.rows)

    def drop(self, choice: tuple[int, ...]) -> float:
        return sum(row.options[index].drop for row, index in zip(self.rows, choice))


def _step(ledger: _Ledger, fits: Callable[[float], bool], axis: int = 0) -> tuple[_Row, int] | None:
    """The unit move with the smallest extra drop per extra weight (``axis`` 0) or FLOP (1) removed, among
    those whose total predicted drop ``fits`` allows; ties: the larger step, then model order."""
    current = ledger.now()
    saved_now = ledger.saved(current)[axis]
    best, best_key = None, None
    for order, row in enumerate(ledger.rows):
        now = row.options[row.chosen]
        for index in range(row.chosen + 1, len(row.options)):
            option = row.options[index]
            choice = current[:order] + (index,) + current[order + 1:]
            saved = ledger.saved(choice)[axis] - saved_now
            if saved <= 0 or not fits(ledger.drop(choice)):
                continue
            key = ((option.drop - now.drop) / saved, -saved, order)
            if best_key is None or key < best_key:
                best, best_key = (row, index), key
    return best


def _trim(ledger: _Ledger, needed: int, axis: int = 0) -> None:
    """Undo overshoot: move a unit back to a lower grid point while the target still holds and the drop does
    not grow; the largest saving of drop first, then the most weights (FLOPs) given back (closest to the target)."""
    while True:
        current = ledger.now()
        total = ledger.saved(current)[axis]
        best, best_key = None, None
        for order, row in enumerate(ledger.rows):
            now = row.options[row.chosen]
            for index in range(row.chosen):
                choice = current[:order] + (index,) + current[order + 1:]
                given_back = total - ledger.saved(choice)[axis]
                if total - given_back < needed or given_back <= 0:
                    continue
                key = (-(now.drop - row.options[index].drop), -given_back)
                if key[0] <= 0 and (best_key is None or key < best_key):
                    best, best_key = (row, index), key
        if best is None:
            return
        best[0].chosen = best[1]


def suggest(scan: Scan, *, max_drop: float | None = None, target_sparsity: float | None = None,
            target_flops: float | None = None, prepared: pipeline.Prepared | None = None) -> Suggestion:
    """Per-unit sparsities from the scan's grid (or 0) that meet one goal; greedy, additive drops (module doc).

    ``prepared`` (the scan's scores, optional) makes the count of removed weights exact for channel groups
    that share layers (`_Ledger`); unstructured counts are exact without it.
    """
    goal = check_goal(max_drop, target_sparsity, target_flops)
    _check_scan(scan)
    if prepared is not None and (prepared.structure, prepared.criterion) != (scan.structure, scan.criterion):
        raise ExplorerError(f"The prepared scores are {prepared.structure} / {prepared.criterion}, the scan "
                            f"{scan.structure} / {scan.criterion}: pass the scan's own prepared scores.")
    rows = _rows(scan)
    ledger = _Ledger(rows, prepared)
    weights = _weights_total(scan)
    if weights <= 0:
        raise ExplorerError("The scan's units hold no weights: there is nothing to suggest.")
    notes = []
    if "max_drop" in goal:
        budget = goal["max_drop"]
        while (move := _step(ledger, lambda drop: drop <= budget + _TOLERANCE)):
            move[0].chosen = move[1]
    else:
        (name, target), = goal.items()
        axis = 0 if name == "target_sparsity" else 1
        what = "sparsity" if axis == 0 else "FLOPs reduction"
        total = weights if axis == 0 else int(scan.flops_dense)
        if total <= 0:
            raise ExplorerError("The scan has no count of the dense model's FLOPs (scanned before they were kept): "
                                "scan again for a FLOPs goal.")
        reachable = ledger.saved(tuple(len(row.options) - 1 for row in rows))[axis] / total
        if reachable + _TOLERANCE < target:
            raise ExplorerError(f"No combination of the scan's grid reaches {target:.1%} {what} (at most "
                                f"{reachable:.1%} without emptying a unit): lower the target or scan higher "
                                "sparsities.")
        needed = math.ceil(target * total - 1e-9)
        while ledger.saved(ledger.now())[axis] < needed and (move := _step(ledger, lambda drop: True, axis)):
            move[0].chosen = move[1]
        _trim(ledger, needed, axis)
        reached = ledger.saved(ledger.now())[axis] / total
        if reached > target + 0.005:
            notes.append(f"the grid's steps are coarse: reached {reached:.1%} for a target of {target:.1%}")
    drop = ledger.drop(ledger.now())
    saved, flops = ledger.saved(ledger.now())
    sign = -1.0 if scan.higher_is_better else 1.0
    predicted = {"value": scan.base + sign * drop, "drop": drop, "sparsity": saved / weights, "flops_saved": flops,
                 "flops_reduction": flops / scan.flops_dense if scan.flops_dense else None}
    return Suggestion(goal=goal, sparsities={row.unit: row.options[row.chosen].sparsity for row in rows},
                      predicted=predicted, note="; ".join(notes), grid_note="; ".join(notes), base=scan.base,
                      metric=scan.metric, measure=scan.measure, higher_is_better=scan.higher_is_better,
                      split=scan.split, samples=scan.samples, structure=scan.structure, criterion=scan.criterion)


def evaluate(model: nn.Module, dataset: Dataset, prepared: pipeline.Prepared, suggestion: Suggestion, *,
             split: str = "val", samples: int | None = None) -> Suggestion:
    """Apply the whole suggestion to a copy of ``model`` and measure it: a new Suggestion with ``actual``.

    The metric is the scan's, on the first ``samples`` of ``split`` (None: all of it): pass the scan's split
    and samples to compare with ``predicted``; ``split="test", samples=None`` gives what
    ``python -m explorer run`` reports for the suggestion's recipe. ``actual["sparsity"]`` is measured on
    the pruned copy (the run's ``sparsity_actual``); ``flops_saved`` is `pipeline.estimate`'s for the plan.
    ``prepared`` must be the scan's scores. ``model`` is never modified.
    """
    if (prepared.structure, prepared.criterion) != (suggestion.structure, suggestion.criterion):
        raise ExplorerError(f"The prepared scores are {prepared.structure} / {prepared.criterion}, the suggestion "
                            f"was scanned with {suggestion.structure} / {suggestion.criterion}.")
    plan = pipeline.preview(prepared, suggestion.plan_spec())
    pruned = pipeline.apply(model, prepared, plan)
    subset, _ = validation_subset(dataset, split, samples)
    task = tasks.task_for(model, subset)
    if task == "accuracy":
        value = tasks.accuracy(pruned, subset, split)
        base = tasks.accuracy(model, subset, split)
    else:
        value = tasks.evaluate_task(pruned, subset, reference=model, task=task, split=split,
                                    measure=suggestion.measure if task == "fidelity" else None)["value"]
        base = tasks.PERFECT[suggestion.measure] if task == "fidelity" else \
            tasks.evaluate_task(model, subset, task=task, split=split)["value"]
    drop = base - value if suggestion.higher_is_better else value - base
    estimate = pipeline.estimate(prepared, plan)
    sparsity = 1 - prunable_counts(pruned)[0] / max(1, prunable_counts(model)[1])  # as `run` reports it
    actual = {"value": value, "drop": drop, "sparsity": sparsity,
              "flops_saved": estimate["flops_dense"] - estimate["flops_after"],
              "flops_reduction": 1 - estimate["flops_after"] / max(1, estimate["flops_dense"]), "base": base,
              "split": split,
              "samples": len(subset.split(split)[1])}
    return dataclasses.replace(suggestion, actual=actual, note=_interaction_note(suggestion, actual))


def _interaction_note(suggestion: Suggestion, actual: dict) -> str:
    """One line: predicted vs actual drop, and why they differ."""
    predicted = suggestion.predicted
    gap = actual["drop"] - predicted["drop"]
    same_subset = actual["split"] == suggestion.split and actual["samples"] == suggestion.samples
    where = "" if same_subset else f" (actual on {actual['samples']} of {actual['split']}, the scan on " \
                                   f"{suggestion.samples} of {suggestion.split})"
    if math.isclose(gap, 0.0, abs_tol=1e-9):
        why = "they agree: on this subset the units' drops add up"
    else:
        why = ("layers interact: each unit was scanned with the rest dense, together their errors compound"
               if gap > 0 else "layers interact: each unit was scanned with the rest dense, together some errors cancel")
    line = (f"predicted drop {predicted['drop']:.4g} (sum of the units' drops alone), actual {actual['drop']:.4g}"
            f"{where}: {why}")
    if abs(actual["sparsity"] - predicted["sparsity"]) > 0.005:
        line += f"; sparsity {actual['sparsity']:.1%} measured vs {predicted['sparsity']:.1%} predicted"
    return line + (f"; {suggestion.grid_note}" if suggestion.grid_note else "")


# --- headless: python -m explorer suggest --------------------------------------------------------


def add_command(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Register ``suggest``: the scan's flags (`sensitivity.add_scan_args`), one goal, --save-recipe."""
    from explorer.sensitivity import add_scan_args

    parser = sub.add_parser("suggest", help="per-layer sparsities from a sensitivity scan for a max drop, a "
                                            "target sparsity or a target FLOPs reduction; predicted and actual "
                                            "result, and the recipe")
    model_args(parser)
    add_scan_args(parser)
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--max-drop", type=float, help="largest acceptable drop of the metric (e.g. 0.02 accuracy)")
    goal.add_argument("--target-sparsity", type=float, help="fraction of the prunable weights to remove, in [0, 1)")
    goal.add_argument("--target-flops", type=float, help="fraction of the dense model's FLOPs per input to remove, "
                                                         "in [0, 1) (theoretical: see the module doc)")
    parser.add_argument("--save-recipe", metavar="FILE", help="write the suggested recipe (YAML) for `run --recipe`")
    return parser


def command(args) -> list[dict]:
    """Scan, suggest, apply and evaluate on the scan's subset; one dict ``{goal, sparsities, predicted, actual,
    note, recipe, scan}``."""
    from explorer.cli import _model_spec
    from explorer.recipe import save_recipe
    from explorer.sensitivity import check_samples, check_sparsities, scan
    from explorer.specs import ScoringSpec

    check_goal(args.max_drop, args.target_sparsity, args.target_flops)  # bad flags fail before the model loads
    scoring = ScoringSpec(structure=args.structure, criterion=args.criterion, norm=args.norm,
                          calib_batches=args.calib_batches).validate()
    check_sparsities(args.sparsities)
    check_samples(args.samples)
    spec = _model_spec(args)
    model, dataset, _ = pipeline.resolve_model(spec, seed=args.seed)
    prepared = pipeline.prepare(model, scoring, dataset=dataset, seed=args.seed)
    result = scan(model, dataset, scoring, sparsities=args.sparsities, split=args.split, samples=args.samples,
                  seed=args.seed, prepared=prepared)
    suggestion = suggest(result, max_drop=args.max_drop, target_sparsity=args.target_sparsity,
                         target_flops=args.target_flops, prepared=prepared)
    suggestion = evaluate(model, dataset, prepared, suggestion, split=args.split, samples=args.samples)
    recipe = suggestion.recipe(Recipe(model=spec, scoring=scoring, seed=args.seed))
    output = {"model": args.model, "data": dataset.name, "goal": suggestion.goal, "sparsities": suggestion.sparsities,
              "predicted": suggestion.predicted, "actual": suggestion.actual, "note": suggestion.note,
              "recipe": recipe.to_dict(),
              "scan": {"seconds": result.seconds, "samples": result.samples, "split": result.split,
                       "metric": result.metric, "measure": result.measure, "base": result.base,
                       "higher_is_better": result.higher_is_better, "structure": result.structure,
                       "criterion": result.criterion, "sparsities": list(result.sparsities)}}
    if args.save_recipe:
        output["saved_recipe"] = str(save_recipe(recipe, args.save_recipe))
    return [output]


def format_human(result: dict) -> str:
    """The suggestion as text: per-unit sparsities, predicted vs actual, the note."""
    scan_info, predicted, actual = result["scan"], result["predicted"], result["actual"]
    (goal, value), = result["goal"].items()
    lines = [f"goal {goal.replace('_', ' ')} {value:g}: {scan_info['structure']} {scan_info['criterion']}, "
             f"{scan_info['metric']} ({scan_info['measure']}) on the first {scan_info['samples']} of "
             f"{scan_info['split']}, "
             f"dense {scan_info['base']:.4g}"]
    lines += [f"  {unit:32s} {sparsity:6.0%}" for unit, sparsity in result["sparsities"].items()]
    for label, numbers_ in (("predicted", predicted), ("actual", actual)):
        if numbers_:
            lines.append(f"{label:9s} {scan_info['measure']} {numbers_['value']:.4g} (drop {numbers_['drop']:.4g}), "
                         f"sparsity {numbers_['sparsity']:.1%}, FLOPs saved {numbers_['flops_saved']:,} per input"
                         + (f" ({numbers_['flops_reduction']:.1%})" if numbers_.get("flops_reduction") is not None
                            else ""))
    lines.append(result["note"])
    if result.get("saved_recipe"):
        lines.append(f"recipe written to {result['saved_recipe']} (python -m explorer run --recipe "
                     f"{result['saved_recipe']})")
    return "\n".join(lines)
