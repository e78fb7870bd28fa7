"""The methods lab's evidence: every method over training time at equal budgets, its cost, and the literature.

* **The claims at the page's defaults** (``claims``): every method and control a published claim names
  (`explorer.methods.lab.CLAIMS`) through `run_lab` at the Methods page's defaults (`lab.DEFAULTS`: 95 %,
  8 epochs, the start model's training counted for methods from fresh weights) on mlp / digits (the default
  model), again at 90 % and under the 'fresh' budget view, and on lenet5 (``--claim-settings``); each claim
  checked on the means with `lab.claims`, the function the page uses.
* **Accuracy at equal budgets** (``accuracy``): every method (and its controls) on lenet5 / digits and
  mlp / digits at 90, 92 and 95 % unstructured sparsity (global scope, magnitude unless the method scores
  otherwise) with the default budget of 8 epochs, both again at 92 % with 30 epochs (the baselines' own
  training length, where methods that start from scratch can learn), and the channel methods on
  resnet20 / shapes at 50 % of the channels (2 epochs); over seeds 0-2 (mean and sample sd), with CPU
  (``time.process_time``) and wall seconds per run. Start models are the zoo's cached baselines
  (``pipeline.resolve_model``, seed 0); the seed varies the method: batch order, fresh weights, masks.
* **All methods together** (``lab``): `explorer.methods.lab.run_lab` on lenet5 / digits with the
  default budget, as the Methods page runs it (each method measured), on every core and on one.
* **Layer collapse at initialisation** (``collapse``): single-shot SNIP / SynFlow / magnitude / random
  against iterative SynFlow (100 rounds), 99 % global, fresh vgg_small and lenet5 weights, no training.
* **Mask bookkeeping** (``overhead``): a plain training step against one on a masked model and one with
  the callbacks of gradual / SET / RigL, interleaved step by step on the same batches (median and
  mean); a masked (``torch.nn.utils.prune``) forward against a plain one.
* **A default's evidence** (``end_fraction``, run on request): gradual pruning's ``end_fraction``.

Runs use one torch thread (``--threads``): the fastest for these small models, and steady when other
work shares the two cores (two threads then spin and run several times slower).

Run from the repository root::

    python -m bench.bench_methods                      # every part but end_fraction; writes bench/RESULTS_methods.md
    python -m bench.bench_methods --parts end_fraction
    python -m bench.bench_methods --parts accuracy --models mlp --sparsities 0.92 --seeds 0 --out -

``--out -`` prints the Markdown instead of writing it. In the results file each part sits between its
own markers (``<!-- accuracy:start -->`` ... ``<!-- accuracy:end -->``) with the date, load and command
of its run, so re-running one part replaces only that part and keeps the hand-written reading.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import cpu_model
from explorer import masking, pipeline
from explorer.baselines import start_epochs
from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, prunable_counts, prunable_layers
from explorer.methods import METHODS, MethodRun, collapsed_layers, run_method
from explorer.methods.at_init import AtInitParams
from explorer.methods.during import GradualParams, SparseTrainingParams, _Evolve, _GradualUpdates, initial_masks
from explorer.methods.lab import CLAIMS, DEFAULTS, run_lab
from explorer.methods.lab import claims as lab_claims
from explorer.recipe import Recipe
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec
from explorer.train import TrainConfig, TrainState, _take_step, evaluate, steps_per_epoch

RESULTS = Path(__file__).with_name("RESULTS_methods.md")
FINETUNE_LR = 1e-4  # Renda et al.'s fine-tuning: a small constant rate (here 1/10 of the recipe's 1e-3)


@dataclass(frozen=True)
class Variant:
    """One row of the tables: a method with its parameters, the criterion it scores with, and its training."""

    label: str
    method: str
    params: dict = field(default_factory=dict)
    criterion: str = "magnitude"
    finetune: dict | None = None  # TrainConfig fields replacing the recipe's defaults (seed stays the run's)


UNSTRUCTURED = [
    Variant("one_shot", "one_shot"),
    Variant("one_shot, fine-tune at constant lr 1e-4", "one_shot", finetune={"lr": FINETUNE_LR, "schedule": "constant"}),
    Variant("iterative (3 rounds)", "iterative"),
    Variant("iterative (6 rounds)", "iterative", {"rounds": 6}),
    Variant("lr_rewinding", "lr_rewinding"),
    Variant("lottery_ticket", "lottery_ticket"),
    Variant("lottery_ticket, reinit control", "lottery_ticket", {"reinit": True}),
    Variant("gradual", "gradual"),
    Variant("gradual, regrow (soft)", "gradual", {"regrow": True}),
    Variant("set", "set"),
    Variant("rigl", "rigl"),
    Variant("at_init snip", "at_init", criterion="snip"),
    Variant("at_init synflow (iterative, 100 rounds)", "at_init", criterion="synflow"),
    Variant("at_init synflow, single shot", "at_init", {"rounds": 1}, criterion="synflow"),
    Variant("at_init random", "at_init", criterion="random"),
    Variant("penalty (l1)", "penalty"),
    Variant("learned_mask movement", "learned_mask"),
    Variant("learned_mask hard_concrete", "learned_mask", {"kind": "hard_concrete"}),
]


def channel_variants(epochs: int) -> list[Variant]:
    """The methods that serve channel structure; iterative gets as many rounds as the budget allows (≤ 3)."""
    rounds = min(3, epochs)
    return [
        Variant("one_shot", "one_shot"),
        Variant("one_shot, fine-tune at constant lr 1e-4", "one_shot",
                finetune={"lr": FINETUNE_LR, "schedule": "constant"}),
        Variant(f"iterative ({rounds} rounds)", "iterative", {"rounds": rounds}),
        Variant("lr_rewinding", "lr_rewinding"),
        Variant("penalty (group_lasso)", "penalty", {"kind": "group_lasso"}),
        Variant("penalty (bn_l1, bn_scale cut)", "penalty", {"kind": "bn_l1"}, criterion="bn_scale"),
    ]


@dataclass(frozen=True)
class Setting:
    """A model, its dataset, a structure, a sparsity and a budget: one column of a table."""

    model: str
    structure: str
    sparsity: float
    epochs: int
    scope: str = "global"
    min_keep: float = 0.0


# ---------------------------------------------------------------------------------------------- runs


def run_one(base, data, setting: Setting, variant: Variant, seed: int) -> dict:
    """One method run: test accuracy, sparsity reached, CPU and wall seconds, or the one line why not."""
    recipe = Recipe.from_dict({
        "model": setting.model,
        "scoring": {"structure": setting.structure, "criterion": variant.criterion},
        "plan": {"sparsity": setting.sparsity, "scope": setting.scope, "min_keep": setting.min_keep},
        "method": {"name": variant.method, **variant.params},
        "budget": {"epochs": setting.epochs},
        "finetune": {**(variant.finetune or {}), "seed": seed} if variant.finetune else None,
        "seed": seed,
    })
    cpu, wall = time.process_time(), time.perf_counter()
    row = {"seed": seed, "error": None}
    try:
        outcome = run_method(recipe, base, data)
    except ExplorerError as exc:
        row.update(error=str(exc).split(":")[0] if "empties" in str(exc) else str(exc))
        row.update(cpu_s=time.process_time() - cpu, wall_s=time.perf_counter() - wall)
        return row
    row.update(cpu_s=time.process_time() - cpu, wall_s=time.perf_counter() - wall)
    row.update(accuracy=evaluate(outcome.model, data, "test")["accuracy"],
               sparsity=1 - prunable_counts(outcome.model)[0] / max(1, prunable_counts(base)[1]),
               epochs=max((p["epoch"] for p in outcome.trajectory), default=0),
               collapsed=collapsed_layers(outcome.model))
    return row


def run_grid(settings: list[Setting], seeds: list[int], log) -> tuple[dict, dict]:
    """Every variant of each setting over ``seeds``; returns ({(setting, label): [rows]}, {model: baseline})."""
    results, baselines = {}, {}
    for setting in settings:
        base, data, _ = pipeline.resolve_model(ModelSpec(setting.model))
        if setting.model not in baselines:
            baselines[setting.model] = {"dataset": data.name, "accuracy": evaluate(base, data, "test")["accuracy"],
                                        "weights": prunable_counts(base)[1]}
        variants = UNSTRUCTURED if setting.structure == "unstructured" else channel_variants(setting.epochs)
        for variant in variants:
            rows = []
            for seed in seeds:
                row = run_one(base, data, setting, variant, seed)
                rows.append(row)
                log(f"{setting.model} {setting.structure} {setting.sparsity:.0%} {setting.epochs} ep | {variant.label} | "
                    f"seed {seed}: " + (row["error"] or f"acc {row['accuracy']:.4f} sparsity {row['sparsity']:.4f}")
                    + f" | cpu {row['cpu_s']:.1f} s wall {row['wall_s']:.1f} s | load {os.getloadavg()[0]:.1f}")
            results[(setting, variant.label)] = rows
    return results, baselines


# ---------------------------------------------------------------------------------------------- a default's evidence


END_FRACTIONS = (0.75, 0.6, 0.5)


def end_fraction_sweep(settings: list[Setting], seeds: list[int], log) -> dict:
    """Gradual pruning's ``end_fraction`` (hard and soft), the evidence behind its default: {setting: {label: rows}}."""
    results = {}
    for setting in settings:
        base, data, _ = pipeline.resolve_model(ModelSpec(setting.model))
        results[setting] = {}
        for regrow in (False, True):
            for fraction in END_FRACTIONS:
                variant = Variant(f"{'soft' if regrow else 'hard'} {fraction}", "gradual",
                                  {"regrow": regrow, "end_fraction": fraction})
                rows = [run_one(base, data, setting, variant, seed) for seed in seeds]
                results[setting][variant.label] = rows
                log(f"{setting.model} {setting.sparsity:.0%} {setting.epochs} ep | gradual {variant.label}: "
                    f"{100 * _mean(rows, 'accuracy'):.1f}")
    return results


# ---------------------------------------------------------------------------------------------- all methods


def lab_timing(epochs: int, sparsity: float, threads: int) -> dict:
    """`run_lab` with every registered method (default parameters) on lenet5 / digits, as the page runs it
    (each method measured: accuracy, FLOPs, latency with ``min_run_time`` 0.3 s), on ``threads`` threads."""
    torch.set_num_threads(threads)
    base, data, _ = pipeline.resolve_model(ModelSpec("lenet5"))
    recipe = Recipe.from_dict({"model": "lenet5", "plan": {"sparsity": sparsity, "scope": "global"},
                               "budget": {"epochs": epochs}, "measure": {"min_run_time": 0.3}})
    cpu, wall = time.process_time(), time.perf_counter()
    results = run_lab(recipe, list(METHODS), base, data)
    return {"threads": threads, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            "methods": len(results), "errors": [r.error for r in results if r.error],
            "accuracy": {r.method: r.metrics["accuracy"] for r in results if r.metrics}}


# ---------------------------------------------------------------------------------------------- collapse at init


def collapse_at_init(model_name: str, sparsity: float) -> list[dict]:
    """Global unstructured pruning of fresh weights: single-shot criteria vs iterative SynFlow, no training."""
    base, data, _ = pipeline.resolve_model(ModelSpec(model_name, baseline=False))
    rows = []
    for criterion in ("snip", "synflow", "magnitude", "random"):
        ctx = _init_context(base, data, criterion, sparsity)
        fresh = ctx.fresh_model(0)
        plan = pipeline.preview(ctx.prepare(fresh), PlanSpec(sparsity, "global"))
        rows.append({"model": model_name, "criterion": f"{criterion}, single shot", "collapsed": plan.collapsed,
                     "collapse_point": plan.collapse_point, "collapse_layer": plan.collapse_layer,
                     "min_density": _min_density_of_plan(plan)})
    ctx = _init_context(base, data, "synflow", sparsity)
    cpu = time.process_time()
    try:
        model = METHODS["at_init"].run(ctx, AtInitParams())
        densities = {name: float((effective_weight(module) != 0).float().mean()) for name, module in prunable_layers(model)}
        layer = min(densities, key=densities.get)
        rows.append({"model": model_name, "criterion": "synflow, iterative (100 rounds)",
                     "collapsed": collapsed_layers(model), "collapse_point": None, "collapse_layer": None,
                     "min_density": (layer, densities[layer]), "cpu_s": time.process_time() - cpu,
                     "sparsity": ctx.sparsity(model)})
    except ExplorerError as exc:
        rows.append({"model": model_name, "criterion": "synflow, iterative (100 rounds)", "collapsed": [str(exc)],
                     "collapse_point": None, "collapse_layer": None, "min_density": None,
                     "cpu_s": time.process_time() - cpu})
    return rows


def _init_context(base, data, criterion: str, sparsity: float) -> MethodRun:
    return MethodRun(model=base, dataset=data, scoring=ScoringSpec("unstructured", criterion),
                     plan_spec=PlanSpec(sparsity, "global"), config=TrainConfig(epochs=0), seed=0)


def _min_density_of_plan(plan) -> tuple[str, float]:
    layer = min(plan.layers, key=lambda entry: (entry.total - entry.pruned) / entry.total)
    return layer.name, (layer.total - layer.pruned) / layer.total


# ---------------------------------------------------------------------------------------------- bookkeeping


def step_overhead(model_name: str, steps: int, epochs: int, sparsity: float) -> dict:
    """Median and mean seconds of one training step, plain vs masked vs masked with each method's callbacks.

    Every variant trains its own copy of the baseline with its own optimiser; at each step all of
    them take a step on the same batch, in an order that rotates, so load drifts hit all alike.
    The callbacks are the methods' own (`_GradualUpdates`, `_Evolve`) with the default Δt of an
    ``epochs`` budget, so their mask updates (scoring, drop / grow) are included at their real rate.
    """
    base, data, _ = pipeline.resolve_model(ModelSpec(model_name))
    config = TrainConfig(epochs=epochs)
    per_epoch = steps_per_epoch(data, config)
    total = per_epoch * epochs
    plan_spec = PlanSpec(sparsity, "global")

    def context() -> MethodRun:
        return MethodRun(model=base, dataset=data, scoring=ScoringSpec(), plan_spec=plan_spec, config=config)

    def masked_copy(seed: int = 0):
        model = clone_model(base)
        masking.set_masks(model, initial_masks(model, sparsity, "erk", seed=seed))
        return model

    gradual_ctx = context()
    start, end = 0, max(1, round(GradualParams().end_fraction * total))
    gradual_dt = max(1, round((end - start) / 10))
    sparse_end = max(1, round(SparseTrainingParams().end_fraction * total))
    sparse_dt = max(1, min(per_epoch, round(sparse_end / 10)))
    set_ctx, rigl_ctx = context(), context()
    variants = {
        "plain (dense, no masks)": (clone_model(base), []),
        "masked (prune re-parametrised), no callbacks": (masked_copy(), []),
        "gradual": (clone_model(base), [_GradualUpdates(gradual_ctx, GradualParams(), start,
                                                        (end - start) // gradual_dt, gradual_dt)]),
        "gradual, regrow (soft)": (clone_model(base), [_GradualUpdates(context(), GradualParams(regrow=True), start,
                                                                       (end - start) // gradual_dt, gradual_dt)]),
        "set": (masked_copy(), [_Evolve(set_ctx, SparseTrainingParams(), "random", sparse_dt, sparse_end)]),
        "rigl": (masked_copy(), [_Evolve(rigl_ctx, SparseTrainingParams(), "gradient", sparse_dt, sparse_end)]),
    }
    states = {}
    for name, (model, callbacks) in variants.items():
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        states[name] = (TrainState(model, optimizer, config, per_epoch, total), callbacks)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    times = {name: [] for name in variants}
    names = list(variants)
    batches = []
    while len(batches) < per_epoch:
        batches.extend(data.batches("train", config.batch_size, shuffle=True, seed=len(batches)))
    for step in range(steps):
        global_step = step % total  # the schedule repeats, so mask updates recur at their rate
        x, y = batches[global_step % per_epoch]
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            state, callbacks = states[name]
            state.epoch, state.step = global_step // per_epoch + 1, global_step % per_epoch + 1
            state.global_step, state.x, state.y = global_step, x, y
            began = time.perf_counter()
            _take_step(state, callbacks, scaler, False)
            times[name].append(time.perf_counter() - began)
    plain = times[names[0]]
    return {"model": model_name, "steps": steps, "per_epoch": per_epoch, "gradual_dt": gradual_dt,
            "sparse_dt": sparse_dt, "batch": config.batch_size,
            "rows": {name: {"median_ms": 1e3 * statistics.median(values), "mean_ms": 1e3 * statistics.fmean(values),
                            "median_ratio": statistics.median(values) / statistics.median(plain),
                            "mean_ratio": statistics.fmean(values) / statistics.fmean(plain)}
                     for name, values in times.items()}}


@torch.no_grad()
def forward_overhead(model_name: str, sparsity: float, blocks: int, block_s: float = 0.02) -> dict:
    """Median seconds of a forward pass (eval, batch 64): plain vs prune-re-parametrised, in interleaved
    blocks of about ``block_s`` seconds each."""
    base, data, _ = pipeline.resolve_model(ModelSpec(model_name))
    plain = clone_model(base).eval()
    masked = masking.apply_masks(base, initial_masks(base, sparsity, "erk", seed=0)).eval()
    x = data.example_input(64)
    times = {"plain": [], "masked": []}
    for model in (plain, masked):
        for _ in range(3):
            model(x)
    began = time.perf_counter()
    plain(x)
    per_block = max(1, round(block_s / (time.perf_counter() - began)))
    for block in range(blocks):
        for name, model in (("plain", plain), ("masked", masked)) if block % 2 == 0 else (("masked", masked),
                                                                                          ("plain", plain)):
            began = time.perf_counter()
            for _ in range(per_block):
                model(x)
            times[name].append((time.perf_counter() - began) / per_block)
    plain_ms, masked_ms = (1e3 * statistics.median(times[name]) for name in ("plain", "masked"))
    return {"model": model_name, "plain_ms": plain_ms, "masked_ms": masked_ms, "ratio": masked_ms / plain_ms}


# ---------------------------------------------------------------------------------------------- report


def _stats(rows: list[dict], key: str) -> tuple[float, float] | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell_accuracy(rows: list[dict]) -> str:
    failed = [row for row in rows if row["error"]]
    value = _stats(rows, "accuracy")
    text = "" if value is None else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"
    if failed:
        reason = failed[0]["error"]
        text += ("; " if text else "") + f"{len(failed)}/{len(rows)} refused: {reason}"
    return text


def _mean(rows: list[dict], key: str) -> float | None:
    value = _stats(rows, key)
    return None if value is None else value[0]


def accuracy_tables(results: dict, baselines: dict, seeds: list[int]) -> list[str]:
    """One table per model and budget: a row per method, a column group per target sparsity."""
    lines = []
    groups: dict[tuple[str, int], list[Setting]] = {}
    for setting, _ in results:
        if setting not in groups.setdefault((setting.model, setting.epochs), []):
            groups[(setting.model, setting.epochs)].append(setting)
    for (model, epochs), settings in groups.items():
        base, first = baselines[model], settings[0]
        unit = "channels" if first.structure == "channel" else "weights"
        lines.append(f"\n### {model} / {base['dataset']}, {first.structure}, {first.scope} scope"
                     + (f", min_keep {first.min_keep}" if first.min_keep else "")
                     + f", budget {epochs} epochs — dense {100 * base['accuracy']:.2f} %\n")
        header = "| method | " + " | ".join(f"{s.sparsity:.0%} {unit}: accuracy % | weights gone % | CPU s (wall)"
                                            for s in settings) + " |"
        lines += [header, "|---|" + "---|---|---|" * len(settings)]
        for label in [label for (setting, label) in results if setting == first]:
            method = next(v.method for v in UNSTRUCTURED + channel_variants(first.epochs) if v.label == label)
            cells = []
            for setting in settings:
                rows = results.get((setting, label), [])
                sparsity, cpu, wall = _mean(rows, "sparsity"), _mean(rows, "cpu_s"), _mean(rows, "wall_s")
                cells.append(f"{_cell_accuracy(rows)} | {'' if sparsity is None else f'{100 * sparsity:.1f}'} | "
                             f"{cpu:.1f} ({wall:.1f})")
            scratch = " *(from scratch)*" if METHODS[method].from_scratch else ""
            lines.append(f"| {label}{scratch} | " + " | ".join(cells) + " |")
    lines.append(f"\nAccuracy: test split, mean ± sample sd over seeds {', '.join(map(str, seeds))}; weights gone: "
                 "fraction of the baseline's prunable weights zeroed or removed (mean); CPU: `time.process_time` "
                 "of the run (all threads), wall in brackets; *from scratch*: the method starts from fresh weights "
                 "and spends the same budget (no dense pre-training beyond it).")
    return lines


def claims(results: dict) -> list[str]:
    """The literature's claims, checked on every setting that has both sides."""
    def compare(claim: str, better: str, worse: str, sparsity_min: float = 0.0) -> list[str]:
        out = []
        for (setting, label), rows in results.items():
            if label != better or setting.sparsity < sparsity_min:
                continue
            other = results.get((setting, worse)) or []
            a, b = _stats(rows, "accuracy"), _stats(other, "accuracy")
            where = f"{setting.model} {setting.sparsity:.0%}, {setting.epochs} ep"
            if a is None or b is None:
                out.append(f"| {claim} | {where} | {_cell_accuracy(rows)} | {_cell_accuracy(other)} | n/a |")
                continue
            diff, spread = 100 * (a[0] - b[0]), 100 * max(a[1], b[1])
            verdict = ("holds" if diff >= 0 else "does not hold") + (" (within 1 sd)" if abs(diff) <= spread else "")
            out.append(f"| {claim} | {where} | {100 * a[0]:.1f} ± {100 * a[1]:.1f} | {100 * b[0]:.1f} ± {100 * b[1]:.1f} "
                       f"| {verdict}, {diff:+.1f} pts |")
        return out

    lines = ["| claim | setting | first | second | verdict |", "|---|---|---|---|---|"]
    for label in sorted({label for (_, label) in results if label.startswith("iterative")}):
        lines += compare(f"{label} ≥ one_shot", label, "one_shot", 0.9)
    lines += compare("lr_rewinding ≥ fine-tuning (constant lr 1e-4)", "lr_rewinding",
                     "one_shot, fine-tune at constant lr 1e-4")
    lines += compare("lr_rewinding ≥ one_shot (cosine fine-tune from lr 1e-3)", "lr_rewinding", "one_shot")
    lines += compare("lottery ticket ≥ reinit control (≥ 90 %)", "lottery_ticket", "lottery_ticket, reinit control", 0.9)
    lines += compare("iterative SynFlow ≥ single-shot SynFlow", "at_init synflow (iterative, 100 rounds)",
                     "at_init synflow, single shot")
    return lines


def han_target(results: dict, baselines: dict, sparsity: float, epochs: int) -> list[str]:
    """Han et al. 2015's target on our LeNet-300-100 analogue: the best method within 0.5 point of dense."""
    rows = {label: _stats(r, "accuracy") for (setting, label), r in results.items()
            if setting.model == "mlp" and abs(setting.sparsity - sparsity) < 1e-9 and setting.epochs == epochs}
    rows = {label: value for label, value in rows.items() if value is not None}
    if not rows or "mlp" not in baselines:
        return []
    dense = baselines["mlp"]["accuracy"]
    ranked = sorted(rows, key=lambda label: -rows[label][0])
    mean, sd = rows[ranked[0]]
    gap = 100 * (dense - mean)
    best_seed = max(row["accuracy"] for row in results[next(key for key in results if key[1] == ranked[0]
                                                             and key[0].model == "mlp" and key[0].epochs == epochs
                                                             and abs(key[0].sparsity - sparsity) < 1e-9)]
                    if row.get("accuracy") is not None)
    return [f"- mlp / digits at {sparsity:.0%}, {epochs} epochs: dense {100 * dense:.2f} %; best method "
            f"**{ranked[0]}** {100 * mean:.2f} ± {100 * sd:.2f} % (mean over seeds; best seed {100 * best_seed:.2f} %), "
            f"{gap:.2f} points below dense: target (≤ 0.5 point, on the mean) **{'met' if gap <= 0.5 else 'not met'}**.",
            "- next: " + "; ".join(f"{label} {100 * rows[label][0]:.2f} ± {100 * rows[label][1]:.2f} %"
                                   for label in ranked[1:5])]


def _render_accuracy(args, result) -> list[str]:
    results, baselines = result
    lines = ["### Dense baselines (the start models: zoo baselines, seed 0, test split)\n",
             "| model / dataset | test accuracy | prunable weights |", "|---|---|---|"]
    lines += [f"| {model} / {b['dataset']} | {100 * b['accuracy']:.2f} % | {b['weights']:,} |"
              for model, b in baselines.items()]
    lines += accuracy_tables(results, baselines, args.seeds)
    lines += ["\n### The literature's claims, checked\n", *claims(results)]
    han = han_target(results, baselines, args.han_sparsity, args.epochs)
    if han:
        lines += [f"\n### Han et al. 2015 target: mlp / digits within 0.5 point of dense at {args.han_sparsity:.0%}, "
                  "default budget\n", *han]
    return lines


def _render_lab(args, result) -> list[str]:
    lines = [f"lenet5 / digits, {args.sparsities[0]:.0%} global magnitude, {args.epochs} epochs, every method with its "
             "default parameters, each measured as on the page (accuracy, FLOPs, latency with min_run_time 0.3 s).\n"]
    for lab in result:
        lines.append(f"- {lab['methods']} methods on {lab['threads']} torch thread(s): **{lab['wall_s']:.1f} s wall**, "
                     f"{lab['cpu_s']:.1f} s CPU; target ≤ 120 s: **{'met' if lab['wall_s'] <= 120 else 'not met'}**"
                     + (f"; refused: {'; '.join(lab['errors'])}" if lab["errors"] else ""))
    lines.append("- accuracy (last timing): " + ", ".join(f"{name} {100 * acc:.1f} %"
                                                         for name, acc in result[-1]["accuracy"].items()))
    return lines


def _render_collapse(args, result) -> list[str]:
    lines = [f"{args.collapse_sparsity:.0%} global unstructured, fresh weights (seed 0), no training.\n",
             "| model | criterion | collapse point (first layer emptied) | layers emptied at the target "
             "| sparsest layer (density kept) |", "|---|---|---|---|---|"]
    for row in result:
        point = ("— (iterative: see the next column)" if row["collapse_point"] is None else
                 f"{100 * row['collapse_point']:.1f} % ({row['collapse_layer']})")
        sparsest = "" if row["min_density"] is None else f"{row['min_density'][0]} ({100 * row['min_density'][1]:.2f} %)"
        emptied = ", ".join(row["collapsed"]) or "none"
        if "cpu_s" in row:
            emptied += f" ({row['cpu_s']:.1f} s CPU for the 100 rounds)"
        lines.append(f"| {row['model']} | {row['criterion']} | {point} | {emptied} | {sparsest} |")
    return lines


def _render_overhead(args, result) -> list[str]:
    counts = ", ".join(f"{r['model']} {r['steps']}" for r in result["steps"])
    lines = [f"Batch 64; steps per variant: {counts}; interleaved step by step on the same batches, "
             f"{args.sparsities[0]:.0%} masks, {args.threads} torch thread(s).\n",
             "| model | variant | median ms | × plain (median) | mean ms (mask updates included) | × plain (mean) |",
             "|---|---|---|---|---|---|"]
    for steps in result["steps"]:
        for name, row in steps["rows"].items():
            lines.append(f"| {steps['model']} | {name} | {row['median_ms']:.3f} | {row['median_ratio']:.2f} "
                         f"| {row['mean_ms']:.3f} | {row['mean_ratio']:.2f} |")
    notes = [f"{r['model']}: {r['per_epoch']} steps per epoch, gradual Δt {r['gradual_dt']}, SET / RigL Δt "
             f"{r['sparse_dt']}" for r in result["steps"]]
    lines.append(f"\nΔt are the defaults for a {args.epochs}-epoch budget ({'; '.join(notes)}).\n")
    lines += ["| model | plain forward ms (median) | masked forward ms (median) | × plain |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['plain_ms']:.3f} | {r['masked_ms']:.3f} | {r['ratio']:.2f} |"
              for r in result["forward"]]
    return lines


def _render_end_fraction(args, result) -> list[str]:
    labels = list(next(iter(result.values())))
    lines = [f"Gradual pruning (magnitude, global), test accuracy % (mean ± sd over seeds "
             f"{', '.join(map(str, args.sweep_seeds))}) by the step at which the masks stop changing "
             "(`end_fraction` of the budget); hard: pruned weights stay pruned, soft: `regrow: true`.\n",
             "| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for setting, rows in result.items():
        cells = [_cell_accuracy(rows[label]) for label in labels]
        lines.append(f"| {setting.model} {setting.sparsity:.0%}, {setting.epochs} ep | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------- the claims at the page's defaults


@dataclass(frozen=True)
class ClaimSetting:
    """The Methods page's defaults on one model, with the sparsity and budget view changed where named."""

    model: str
    sparsity: float = DEFAULTS.sparsity
    view: str = DEFAULTS.view


def claims_at_defaults(settings: list[ClaimSetting], seeds: list[int], log) -> list[dict]:
    """Every claim's entries through `run_lab` as the Methods page runs them (no latency), over ``seeds``."""
    names = list(dict.fromkeys(name for claim in CLAIMS for name in claim.order))
    out = []
    for setting in settings:
        spec = ModelSpec(setting.model)
        base, data, _ = pipeline.resolve_model(spec)
        start = start_epochs(spec, len(data.y_train))
        rows: dict[str, list[dict]] = {name: [] for name in names}
        for seed in seeds:
            recipe = Recipe.from_dict({
                "model": setting.model, "plan": {"sparsity": setting.sparsity, "scope": "global"},
                "budget": {"epochs": DEFAULTS.epochs, "view": setting.view, "start_epochs": start},
                "finetune": {"lr": DEFAULTS.lr, "batch_size": DEFAULTS.batch_size, "seed": seed},
                "measure": {"latency": False}, "seed": seed})
            for result in run_lab(recipe, names, base, data):
                epochs = max((p["epoch"] for p in result.trajectory), default=0)
                rows[result.method].append({"accuracy": result.metrics["accuracy"] if result.metrics else None,
                                            "error": None if result.metrics else result.error, "epochs": epochs,
                                            "sparsity": result.metrics["sparsity_actual"] if result.metrics else None})
                log(f"{setting.model} {setting.sparsity:.0%} {setting.view} seed {seed} | {result.method}: "
                    + (result.error or f"acc {result.metrics['accuracy']:.4f}") + f" | load {os.getloadavg()[0]:.1f}")
        out.append({"setting": setting, "start_epochs": start, "classes": data.num_classes, "dense": evaluate(base, data, "test")["accuracy"],
                    "rows": rows})
    return out


def _render_claims(args, results: list[dict]) -> list[str]:
    lines = [f"Every claim's methods and controls through `run_lab` at the Methods page's defaults "
             f"(`explorer.methods.lab.DEFAULTS`: {DEFAULTS.sparsity:.0%} global magnitude, budget {DEFAULTS.epochs} "
             f"epochs, Adam lr {DEFAULTS.lr:g}, batch {DEFAULTS.batch_size}, cosine; the budget view "
             f"'{DEFAULTS.view}': the start model's own training counted for the methods from fresh weights), over seeds "
             f"{', '.join(map(str, args.seeds))}; test accuracy mean ± sample sd. Rows that change a default say which."]
    verdicts = []
    for block in results:
        setting, rows = block["setting"], block["rows"]
        title = (f"{setting.model} / digits, {setting.sparsity:.0%}, view '{setting.view}'"
                 + (f" (start model's {block['start_epochs']} epochs counted)" if setting.view == "counted" else ""))
        lines += [f"\n### {title} — dense {100 * block['dense']:.2f} %\n",
                  "| method or control | accuracy % | epochs trained | sparsity (mask) % |", "|---|---|---|---|"]
        means, errors = {}, {}
        for name, runs in rows.items():
            ran = [r for r in runs if r["accuracy"] is not None]
            refused = [r for r in runs if r["accuracy"] is None]
            cell = ""
            if ran:
                accuracies = [r["accuracy"] for r in ran]
                means[name] = statistics.mean(accuracies)
                sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
                cell = f"{100 * means[name]:.1f} ± {100 * sd:.1f}"
            if refused:
                reason = (refused[0]["error"] or "").split(": ", 1)[-1].split(":")[0]
                cell += ("; " if cell else "") + f"{len(refused)}/{len(runs)} refused: {reason}"
                if not ran:
                    errors[name] = reason
            epochs = max((r["epochs"] for r in runs), default=0)
            sparsity = statistics.mean([r["sparsity"] for r in ran]) if ran else None
            lines.append(f"| {name} | {cell} | {epochs} | {'' if sparsity is None else f'{100 * sparsity:.1f}'} |")
        for row in lab_claims(means, errors, chance=1 / block["classes"]):
            verdicts.append(f"| {'✅' if row['holds'] else '❌'} | {row['claim']} ({row['source']}) | {title} | "
                            f"{row['numbers']} (means) |")
    lines += ["\n### The claims, checked on the means\n", "| | claim | setting | numbers |", "|---|---|---|---|",
              *verdicts]
    return lines


PARTS = {"accuracy": ("Accuracy at equal budgets", _render_accuracy),
         "lab": ("All methods together (`run_lab`)", _render_lab),
         "collapse": ("Layer collapse at initialisation", _render_collapse),
         "overhead": ("Mask bookkeeping: one training step and one forward", _render_overhead),
         "end_fraction": ("Gradual pruning's end_fraction (the evidence for its default)", _render_end_fraction),
         "claims": ("The literature's claims at the Methods page's defaults", _render_claims)}


def render(args, name: str, result, run: dict) -> str:
    """One part's block: how it was run (machine, date, load, command, cost), then its tables."""
    title, body = PARTS[name]
    lines = [f"## {title}\n",
             f"*Run {datetime.date.today().isoformat()} on {cpu_model()}, nproc {os.cpu_count()}, torch "
             f"{torch.__version__}, cpu; load average (1 min) {run['load_start']:.1f} at start, {run['load_end']:.1f} "
             f"at end; {run['wall_s']:.0f} s wall, {run['cpu_s']:.0f} s CPU; "
             f"`{' '.join(['python -m bench.bench_methods', *sys.argv[1:]])}`*\n", *body(args, result)]
    return "\n".join(lines) + "\n"


def write(blocks: dict[str, str], out: str) -> None:
    """Print (``-``) or put each part between its markers, keeping the other parts and the hand-written text."""
    if out == "-":
        print("\n".join(blocks.values()))
        return
    path = Path(out)
    text = path.read_text() if path.exists() else "# Methods over training time: evidence\n"
    for name, block in blocks.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        marked = f"{start}\n{block}{end}"
        if start in text and end in text:
            before, rest = text.split(start, 1)
            text = before + marked + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + marked + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def _floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="claims,accuracy,lab,collapse,overhead",
                        help="comma list of claims, accuracy, lab, collapse, overhead, end_fraction (not run by default)")
    parser.add_argument("--models", default="lenet5,mlp,resnet20", help="comma list of lenet5, mlp, resnet20")
    parser.add_argument("--sparsities", type=_floats, default=[0.9, 0.95], help="unstructured targets (digits models)")
    parser.add_argument("--han-sparsity", type=float, default=0.92,
                        help="one more target for both digits models (mlp: the Han et al. target); 0 leaves it out")
    parser.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--sweep-seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1, 2, 3, 4, 5],
                        help="seeds of the end_fraction part")
    parser.add_argument("--epochs", type=int, default=8, help="budget for the digits models (the default budget)")
    parser.add_argument("--long-epochs", type=int, default=30,
                        help="a longer digits budget (the baselines' own 30 epochs) for from-scratch methods; 0: none")
    parser.add_argument("--long-sparsities", type=_floats, default=[0.92])
    parser.add_argument("--resnet-epochs", type=int, default=2, help="budget for resnet20 / shapes")
    parser.add_argument("--channel-sparsity", type=float, default=0.5)
    parser.add_argument("--channel-min-keep", type=float, default=0.1)
    parser.add_argument("--collapse-sparsity", type=float, default=0.99)
    parser.add_argument("--overhead-steps", type=int, default=1200)
    parser.add_argument("--overhead-models", default="lenet5,mlp,resnet20:150",
                        help="models whose training step is timed, each with :STEPS to change --overhead-steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: fastest for these small models, and steady when the machine is shared); "
                             "the lab is also timed on every core, as the app runs it")
    parser.add_argument("--claim-settings", default="mlp,mlp:0.9,mlp:0.95:fresh,lenet5",
                        help="claims part: MODEL[:SPARSITY[:VIEW]] entries, the page's defaults where left out")
    parser.add_argument("--out", default=str(RESULTS), help="results file, or - to print")
    args = parser.parse_args()
    parts, models = args.parts.split(","), args.models.split(",")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def accuracy():
        digits = [model for model in ("lenet5", "mlp") if model in models]
        targets = sorted(set(args.sparsities + ([args.han_sparsity] if args.han_sparsity else [])))
        settings = [Setting(model, "unstructured", sparsity, args.epochs) for model in digits for sparsity in targets]
        if args.long_epochs:
            settings += [Setting(model, "unstructured", sparsity, args.long_epochs) for model in digits
                         for sparsity in args.long_sparsities]
        if "resnet20" in models:
            settings.append(Setting("resnet20", "channel", args.channel_sparsity, args.resnet_epochs,
                                    min_keep=args.channel_min_keep))
        return run_grid(settings, args.seeds, log)

    def lab():
        timings = []
        for threads in dict.fromkeys([os.cpu_count(), args.threads]):
            log(f"run_lab: every method on lenet5 / digits, {threads} thread(s)")
            timings.append(lab_timing(args.epochs, args.sparsities[0], threads))
            log(f"  {timings[-1]['wall_s']:.1f} s wall")
        return timings

    def collapse():
        return [row for model in ("lenet5", "vgg_small") for row in collapse_at_init(model, args.collapse_sparsity)]

    def overhead():
        models = [(entry.split(":")[0], int(entry.split(":")[1]) if ":" in entry else args.overhead_steps)
                  for entry in args.overhead_models.split(",")]
        return {"steps": [step_overhead(model, steps, args.epochs, args.sparsities[0]) for model, steps in models],
                "forward": [forward_overhead(model, args.sparsities[0], 60) for model, _ in models]}

    def end_fraction():
        digits = [model for model in ("lenet5", "mlp") if model in models]
        targets = sorted(set(args.sparsities + ([args.han_sparsity] if args.han_sparsity else [])))
        settings = [Setting(model, "unstructured", sparsity, args.epochs) for model in digits for sparsity in targets]
        if args.long_epochs:
            settings += [Setting(model, "unstructured", sparsity, args.long_epochs) for model in digits
                         for sparsity in args.long_sparsities]
        return end_fraction_sweep(settings, args.sweep_seeds, log)

    def claims_part():
        settings = [ClaimSetting(entry.split(":")[0], *([float(entry.split(":")[1])] if ":" in entry else []),
                                 *([entry.split(":")[2]] if entry.count(":") > 1 else []))
                    for entry in args.claim_settings.split(",")]
        return claims_at_defaults(settings, args.seeds, log)

    runners = {"accuracy": accuracy, "lab": lab, "collapse": collapse, "overhead": overhead,
               "end_fraction": end_fraction, "claims": claims_part}
    blocks = {}
    for name in parts:
        log(f"== {name}")
        torch.set_num_threads(args.threads)
        load, cpu, wall = os.getloadavg()[0], time.process_time(), time.perf_counter()
        result = runners[name]()
        run = {"load_start": load, "load_end": os.getloadavg()[0], "cpu_s": time.process_time() - cpu,
               "wall_s": time.perf_counter() - wall}
        blocks[name] = render(args, name, result, run)
    write(blocks, args.out)


if __name__ == "__main__":
    main()
