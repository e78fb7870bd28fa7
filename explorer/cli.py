"""Headless command line: ``python -m explorer inspect | prune | run | sensitivity | sweep | suggest | deploy``.

The flags build a Recipe (`explorer.recipe`), and the same core calls as the app run it —
the same scoring, plan and measurement (`pipeline.measure_run`, latency at batch 64 by
default) — so the numbers match for the same seed. With ``--json`` the output is machine-readable: ``inspect`` prints one JSON object; ``prune`` prints one
JSON object per requested sparsity, one per line. Any bad argument or input exits with
status 2 and a one-line reason on stderr.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from explorer import basecache, compat, criteria, hf, limits, llm, measure, pipeline, planner, semistructured, sensitivity, stats, suggest, sweep, tasks, timing
from explorer import lean as lean_path
from explorer.data import DATASETS, Dataset
from explorer.deploy.runtimes import DEFAULT_RUNTIMES, RUNTIMES
from explorer.errors import ExplorerError, ExplorerWarning
from explorer.models import SAVE_FORMAT, ZOO, save_model
from explorer.recipe import Recipe
from explorer.specs import MeasureSpec, ModelSpec, PlanSpec, ScoringSpec


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be numbers separated by commas, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one sparsity")
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"sparsity {value} is outside [0, 1]")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1)")
    return value


def _save(model, path, **saved) -> None:
    """`save_model`, with a place that refuses the file (read-only, full) said in one line."""
    try:
        save_model(model, path, **saved)
    except OSError as exc:
        raise ExplorerError(f"Cannot write the model to '{path}' ({exc.strerror or exc}); "
                            "choose another --save.") from exc


def _whole(low: int, high: int):
    """An argparse type: a whole number in [low, high] (`explorer.limits`), else one line with the bounds."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low:,} to {high:,}, got '{text}'")
        return value
    return parse


def _positive(text: str) -> int:
    """A positive whole number, bounded by the largest batch (the widest count a flag here takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    if value > limits.MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{value} is above the limit of {limits.MAX_BATCH:,}")
    return value


SAVE_FLAGS = ("save", "save_recipe")  # every flag that names a file a command writes at its end


def check_save_path(path: str | None, flag: str = "--save") -> None:
    """Refuse a file to write that cannot become one, before any work starts (else the work is lost at the end)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        example = target / ("recipe.yaml" if "recipe" in flag else "model.pt")
        raise ExplorerError(f"{flag} '{path}' is a folder; give a file name, e.g. {example}.")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ExplorerError(f"{flag} '{path}': '{parent}' is a file, not a folder; choose another path.")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m explorer", description="Pruning Explorer, headless.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True,
                       help=f"zoo name ({', '.join(ZOO)}), a built-in transformer ({', '.join(hf.BUILTIN)}), "
                            "hf:FOLDER (a local Hugging Face model), a model file, or package.module:callable")
        p.add_argument("--data", choices=[d for d in DATASETS if d != "tensors"] + ["tensors", "text"],
                       help="dataset (default: the zoo model's usual one, text for transformers, else digits)")
        p.add_argument("--data-file", help="the .pt/.npz file for --data tensors; a .txt/.jsonl/.csv for --data text")
        p.add_argument("--arch", help="architecture for a state-dict file (zoo name or module:callable)")
        p.add_argument("--weights", help="weights file for a zoo model or factory")
        p.add_argument("--baseline", action="store_true",
                       help="use the trained baseline of a zoo model (trains once, then cached)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow pickled nn.Module files (they can run code: only for files you trust)")
        p.add_argument("--seed", type=_whole(0, limits.MAX_SEED), default=0)
        p.add_argument("--json", action="store_true", help="machine-readable output")

    inspect = sub.add_parser("inspect", help="per-layer weight (and gradient) statistics")
    model_args(inspect)
    inspect.add_argument("--calib-batches", type=_whole(1, limits.MAX_CALIB_BATCHES), default=None,
                         help="also summarise gradients over N calibration batches")
    inspect.add_argument("--bins", type=_whole(1, limits.MAX_BINS), default=30)
    inspect.add_argument("--compat", action="store_true",
                         help="also report what each structure can prune here, what torch-pruning cannot trace and "
                              "why, head-count steps and the estimated scoring cost, before any cut")

    prune = sub.add_parser("prune", help="plan (and optionally apply and measure) pruning")
    model_args(prune)
    prune.add_argument("--structure", choices=list(pipeline.STRUCTURES), default="unstructured")
    prune.add_argument("--criterion", choices=list(criteria.CRITERIA), default="magnitude")
    prune.add_argument("--scope", choices=list(planner.SCOPES), default="local")
    prune.add_argument("--sparsity", type=_sparsities, default=None,
                       help="S or S1,S2,... in [0, 1] (required, except for --structure nm, which fixes it)")
    prune.add_argument("--nm", default=ScoringSpec.nm, help="the N:M pattern of --structure nm: 2:4 (default) or 4:8")
    prune.add_argument("--protect", nargs="+", default=[], metavar="LAYER", help="layers never pruned")
    prune.add_argument("--min-keep", type=_fraction, default=0.0, help="global scope: keep this fraction of every layer")
    prune.add_argument("--round-to", type=_whole(1, 1024), default=1, metavar="N",
                       help="channel structure: round each layer's kept channels to a multiple of N (8, 16, 32)")
    prune.add_argument("--norm", choices=["l1", "l2"], default="l1", help="channel magnitude norm")
    prune.add_argument("--calib-batches", type=_whole(1, limits.MAX_CALIB_BATCHES), default=4)
    prune.add_argument("--calib-samples", type=_whole(1, limits.MAX_BATCH), default=None,
                       help="transformers: calibration sequences (default: calib-batches x 64 lines)")
    prune.add_argument("--calib-seqlen", type=_whole(2, limits.MAX_SEQ_LEN), default=None,
                       help="transformers: tokens per calibration sequence (default: the dataset's 64)")
    prune.add_argument("--calib-mode", choices=["lines", "windows"], default="lines",
                       help="transformers: 'windows' cuts the sequences from the concatenated token stream, as the "
                            "papers do; 'lines' takes one example each (padding is left out of the statistics)")
    prune.add_argument("--sequential", action="store_true",
                       help="wanda / sparsegpt: calibrate each transformer block on the outputs of the already pruned "
                            "blocks before it, as the papers' code does (default: one pass of the dense model)")
    prune.add_argument("--progress", action="store_true",
                       help="print each slow stage (load, calibration batches, blocks, measurement: counts, task metric, "
                            "latency) to stderr; Ctrl-C during a measurement keeps what is done")
    prune.add_argument("--include-head", action="store_true",
                       help="causal LMs: also prune the layers outside the transformer blocks (lm_head); by default "
                            "only the blocks' Linears are pruned, as the Wanda and SparseGPT papers do")
    prune.add_argument("--measure", action="store_true", help="measure latency of dense and pruned models")
    prune.add_argument("--batch", type=_positive, default=MeasureSpec.batch,
                       help=f"batch size for latency (default {MeasureSpec.batch}, as the app); FLOPs are per input")
    prune.add_argument("--threads", type=_whole(1, limits.MAX_THREADS), default=None,
                       help="threads for latency (default: torch's)")
    prune.add_argument("--save", help="write the pruned model (last sparsity; with several, FILE gets -S suffixes)")
    prune.add_argument("--stream", action="store_true",
                       help="hf: folders of safetensors shards: prune one transformer block at a time from disk to "
                            "--out, so the whole model is never in memory (local magnitude, wanda or sparsegpt)")
    prune.add_argument("--out", metavar="DIR", help="--stream: the folder the pruned model is written to (new or empty)")
    prune.add_argument("--stream-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                       help="--stream: compute dtype (auto: bfloat16 for a bf16 folder, else float32; statistics "
                            "always float32 or wider, tensors written in their stored dtype)")
    prune.add_argument("--eval", choices=["none", "pruned", "both"], default="pruned",
                       help="--stream: the test perplexity to report, streamed (the pruned folder's, both, or none)")
    prune.add_argument("--eval-tokens", type=_whole(0, limits.MAX_EVAL_TOKENS), default=MeasureSpec.eval_tokens,
                       metavar="N",
                       help="causal LMs: perplexity on the test split's first sequences holding at most N tokens, the "
                            f"same for base and pruned, in memory or streamed (default {MeasureSpec.eval_tokens:,}, as "
                            "the app and recipes; 0: the whole split); the output line says how many were scored")
    prune.add_argument("--fresh-base", action="store_true",
                       help="measure the base model again even when the cache holds its figures for this hf: folder "
                            "and these settings")
    prune.add_argument("--plan-only", action="store_true",
                       help="only plan: per-layer cuts, collapse and estimated params / FLOPs, without applying, "
                            "evaluating or measuring (what the app's preview shows, in a fraction of the time)")
    run = sub.add_parser("run", help="run a recipe (or replay a downloaded run.yaml): its method within its budget")
    run.add_argument("--recipe", required=True, help="YAML/JSON recipe, or the run.yaml of a downloaded run")
    run.add_argument("--save", help="write the pruned (and fine-tuned) model to FILE")
    run.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    run.add_argument("--trust-pickle", action="store_true",
                     help="allow a pickled nn.Module model file (it can run code; a recipe itself cannot allow it)")
    run.add_argument("--trust-factory", action="store_true",
                     help="allow the recipe to import and call the package.module:callable factory it names "
                          "(importing runs its code; a recipe itself cannot allow it)")
    run.add_argument("--json", action="store_true", help="machine-readable output")
    sensitivity.add_command(sub, model_args)
    sweep.add_command(sub, model_args)
    suggest.add_command(sub, model_args)
    deploy = sub.add_parser("deploy", help="export a pruned model and time it dense vs pruned on several runtimes")
    deploy.add_argument("--model", required=True, help="a model file saved by Pruning Explorer, or run:ID (a stored run)")
    deploy.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES),
                        help=f"comma-separated, of {', '.join(RUNTIMES)} (default {','.join(DEFAULT_RUNTIMES)})")
    deploy.add_argument("--batch", type=_batches, default=(1, MeasureSpec.batch),
                        help=f"batch sizes, comma-separated (default 1,{MeasureSpec.batch})")
    deploy.add_argument("--threads", type=_whole(1, limits.MAX_THREADS), default=None,
                        help="threads for every runtime (default: torch's, lowered to the free cores)")
    deploy.add_argument("--max-run-time", type=float, default=None, help="seconds of timing per row at most (default 3)")
    deploy.add_argument("--export", metavar="DIR", help="also export dense and pruned (ONNX, TorchScript, .pt2) to DIR "
                                                         "and check each file against PyTorch")
    deploy.add_argument("--quantize", choices=["int8"], help="also compare dynamic int8 of the pruned model (ONNX "
                                                            "Runtime) with the fp32 pruned and dense files")
    deploy.add_argument("--trust-pickle", action="store_true", help="allow a pickled nn.Module file")
    deploy.add_argument("--json", action="store_true", help="machine-readable output: one JSON object")
    restore = sub.add_parser("restore", help="put runs the run store refused (kept in files) back into it")
    restore.add_argument("files", nargs="*", metavar="FILE",
                         help="a kept-runs .json (default: every file in the store's unsaved/ folder)")
    restore.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def cmd_restore(args) -> list[dict]:
    """Each kept file's runs back in the store (`RunStore.restore`), in order; the first refusal stops with one line."""
    from explorer.store import RunStore

    store = RunStore()
    files = [Path(name) for name in args.files] or store.kept_files()
    if not files:
        return [{"file": None, "ids": [], "weights": [],
                 "line": f"nothing to restore: {store.root / 'unsaved'} holds no kept runs"}]
    results = []
    for index, path in enumerate(files):
        try:
            runs = store.restore(path)
        except ExplorerError as exc:
            before = f" ({index} file(s) before it were restored)" if index else ""
            raise type(exc)(f"{exc}{before}") from None
        weights = [run.id for run in runs if store.weights_path(run.id).exists()]
        results.append({"file": str(path), "ids": [run.id for run in runs], "weights": weights,
                        "line": f"restored {len(runs)} run(s) from {path}: id {', '.join(str(r.id) for r in runs)}"
                                + (f"; weights of run {', '.join(map(str, weights))}" if weights else "")})
    return results


def _batches(text: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(_positive(part.strip()) for part in text.split(",") if part.strip())) or (1,)


def cmd_deploy(args) -> list[dict]:
    """Runtimes side by side (and exports) for a pruned model file or a stored run."""
    from explorer.deploy import export, quantize, runtimes, source

    names = runtimes.parse_runtimes(args.runtimes)
    if args.max_run_time is not None and not 0 < args.max_run_time <= limits.MAX_SECONDS:
        raise ExplorerError(f"--max-run-time must be seconds in (0, {limits.MAX_SECONDS:g}], got {args.max_run_time}.")
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        raise ExplorerError(f"--export '{args.export}' is a file; give a folder to write the exported models into.")
    pair = source.load_pair(args.model, trust_pickle=args.trust_pickle)
    example = pair.example_input(max(args.batch))
    result = {"model": pair.label, "data": pair.dataset.name, "note": pair.note or None,
              "runtimes": runtimes.compare_runtimes(pair.dense, pair.pruned, example, runtimes=names,
                                                    batches=args.batch, threads=args.threads,
                                                    min_run_time=min(0.5, args.max_run_time or 0.5),
                                                    max_run_time=args.max_run_time)}
    if args.export:
        try:
            result["exports"] = {label: [e.to_dict() for e in export.export_all(model, example[:2], args.export,
                                                                               stem=label)]
                                 for label, model in (("dense", pair.dense), ("pruned", pair.pruned))}
        except OSError as exc:
            raise ExplorerError(f"Cannot write into --export '{args.export}' ({exc.strerror or exc}); "
                                "choose another folder.") from None
    if args.quantize:
        result["int8"] = quantize.compare(pair.dense, pair.pruned, pair.dataset, batch=max(args.batch),
                                          threads=args.threads, max_run_time=args.max_run_time,
                                          folder=Path(args.export) / "int8" if args.export else None,
                                          evaluate=pair.dense_trained)
    return [result]


def _runtime_line(row: dict) -> str:
    """One runtime row of `deploy.runtimes.compare_runtimes` as a line of text."""
    head = f"  {row['runtime']:17s} batch {row['batch']:<5d}"
    if row.get("error"):
        return f"{head} {row['error']}"
    measured = {"speedup_measured": row["speedup"], "speedup_interval": row["speedup_interval"],
                "speedup_noisy": row["noisy"]}
    setup = f"; compile/export {sum(row['setup_s'].values()):.1f} s" if row.get("setup_s") else ""
    return (f"{head} {row['dense_ms']:.3f} -> {row['pruned_ms']:.3f} ms, measured {timing.speedup_text(measured)}, "
            f"measured / FLOPs {row['measured_over_flops']:.2f}{setup}")


def _print_deploy(result: dict) -> None:
    timed = result["runtimes"]
    print(f"{result['model']} on {result['data']}: FLOPs speed-up {timed['speedup_flops']:.2f}x "
          f"({timed['threads']} threads, load {timed['load']['load1']:.1f} on {timed['load']['cores']} cores)")
    if result.get("note"):
        print(f"  note: {result['note']}")
    if timed.get("threads_note"):
        print(f"  threads {timed['threads_note']}")
    for row in timed["rows"]:
        print(_runtime_line(row))
    for row in (result.get("int8") or {}).get("rows", []):
        metric = f", {result['int8']['task']} {row['metric']:.4g}" if row.get("metric") is not None else ""
        print(f"  {row['model']:12s} {row['size_bytes']:,} bytes ({row['size_vs_dense']:.2f}x dense), "
              f"{row['latency_ms']:.3f} ms at batch {result['int8']['batch']} on ONNX Runtime{metric}")
    for label, exports in (result.get("exports") or {}).items():
        for item in exports:
            if item["error"]:
                print(f"  export {label} {item['format']}: {item['error']}")
            else:
                print(f"  export {label} {item['format']}: {item['path']} {item['size_bytes']:,} bytes "
                      f"({item['compressed_bytes']:,} deflated), max abs diff {item['max_abs_diff']:.2e}"
                      f"{'' if item['dynamic_batch'] else ', fixed batch'}")


def cmd_run(args) -> list[dict]:
    from explorer.recipe import check_factories, load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    check_factories(recipe, trusted=args.trust_factory)
    if args.no_latency:
        recipe = recipe.replace(measure={"latency": False})
    if args.trust_pickle:  # the person running it, never the file, allows pickles
        recipe = recipe.replace(model={"trust_pickle": True})
    outcome = run_recipe(recipe)
    result = run_summary(outcome)
    if args.save:
        dataset = outcome["dataset"]
        _save(outcome["model"], args.save, arch=outcome["arch"], input_shape=dataset.input_shape,
              num_classes=dataset.num_classes, metadata={"recipe": outcome["recipe"]})
        result["saved"] = args.save
    return [result]


def run_summary(outcome: dict) -> dict:
    """What ``run --json`` prints of a `run_recipe` outcome (a sweep prints the same for each point)."""
    plan = outcome["plan"]
    return {"recipe": outcome["recipe"], "sparsity_actual": outcome["metrics"]["sparsity_actual"],
            "collapsed": outcome["collapsed"], "collapse_point": plan.collapse_point if plan else None,
            "metrics": outcome["metrics"], "history": outcome["history"], "trajectory": outcome["trajectory"]}


def _model_spec(args) -> ModelSpec:
    if args.baseline and args.model not in ZOO:
        raise ExplorerError("--baseline works with zoo names only.")
    return ModelSpec(source=args.model, data=args.data, data_file=args.data_file, arch=args.arch,
                     weights=args.weights, baseline=args.baseline, trust_pickle=args.trust_pickle).validate()


def _resolve(args, progress=None) -> tuple[torch.nn.Module, Dataset, str]:
    return pipeline.resolve_model(_model_spec(args), seed=args.seed, progress=progress)


def recipe_from_args(args, sparsity: float) -> Recipe:
    """The Recipe that ``prune`` flags describe, for one sparsity."""
    return Recipe(
        model=_model_spec(args),
        scoring=ScoringSpec(structure=args.structure, criterion=args.criterion, norm=args.norm,
                            calib_batches=args.calib_batches, nm=args.nm, include_head=args.include_head,
                            calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                            calib_mode=args.calib_mode, sequential=args.sequential),
        plan=PlanSpec(sparsity=sparsity, scope=args.scope, protect=tuple(args.protect), min_keep=args.min_keep,
                      round_to=args.round_to),
        measure=MeasureSpec(latency=args.measure, batch=args.batch, threads=args.threads,
                            eval_tokens=getattr(args, "eval_tokens", None)),
        seed=args.seed,
    ).validate()


def cmd_inspect(args) -> list[dict]:
    model, dataset, _ = _resolve(args)
    weights = stats.weight_stats(model, bins=args.bins)
    gradients = None
    if args.calib_batches:
        gradients = stats.gradient_stats(model, dataset.calibration(args.calib_batches, seed=args.seed), bins=args.bins)
    layers = []
    for name, summary in weights.items():
        row = {"name": name, **summary}
        if gradients is not None:
            row["gradient"] = {k: v for k, v in gradients[name].items() if k not in ("kind", "shape")}
        layers.append(row)
    result = {"model": args.model, "data": dataset.name, "layers": layers}
    if args.compat:
        result["compat"] = compat.report(model, dataset.example_input(1))
    return [result]


def _save_path(base: str, sparsity: float, many: bool) -> Path:
    path = Path(base)
    return path.with_name(f"{path.stem}-{sparsity:g}{path.suffix or '.pt'}") if many else path


def cmd_prune(args) -> list[dict]:
    if args.structure == "nm":
        fixed = pipeline.nm_sparsity(llm.parse_nm(args.nm))
        if args.sparsity not in (None, [fixed]):
            raise ExplorerError(f"--structure nm with --nm {args.nm} fixes the sparsity at {fixed:g}; drop --sparsity.")
        args.sparsity = [fixed]
    elif args.sparsity is None:
        accepted = "S" if args.stream else "S or S1,S2,..."
        raise ExplorerError(f"--sparsity is required ({accepted}), except with --structure nm.")
    if args.stream:
        from explorer import stream

        return stream.command(args, _stage_printer() if args.progress else None)
    if args.plan_only and (args.save or args.measure):
        raise ExplorerError("--plan-only prunes nothing, so there is nothing to --save or --measure: drop one.")
    progress = _stage_printer() if args.progress else None
    if progress:
        progress(0.0, "loading the model and data")
    model, dataset, arch = _resolve(args, progress)  # a first baseline prints its epochs
    recipes = [recipe_from_args(args, sparsity) for sparsity in args.sparsity]
    lean = lean_path.refusal(model, recipes[0].scoring, recipes[0].plan) is None  # same masks, a fraction of the memory
    in_place = (lean and len(recipes) == 1 and not args.measure  # the base is measured first; latency would need it
                and tasks.task_for(model, dataset) == "perplexity")
    prepared = pipeline.prepare(model, recipes[0].scoring, dataset=dataset, seed=args.seed, progress=progress,
                                lean=lean)
    kinds = {g.name: g.kind for g in prepared.groups} or prepared.layer_kinds
    task_name = tasks.task_for(model, dataset)
    base_value, base_figures, reused = None, None, False
    if not args.plan_only:
        base_value, base_figures, reused = _base_figures(args, model, dataset, recipes[0].measure, task_name, progress)
    dense_outputs = None  # fidelity compares every pruned copy with the same dense outputs: computed once
    results = []
    for recipe in recipes:
        plan = pipeline.preview(prepared, recipe.plan)
        result = {
            "model": args.model, "data": dataset.name, "structure": args.structure, "criterion": args.criterion,
            "scope": args.scope, "sparsity": recipe.plan.sparsity, "sparsity_actual": plan.sparsity_actual,
            "layers": [{"name": lp.name, "kind": kinds.get(lp.name, ""), "total": lp.total, "kept": lp.kept,
                        "sparsity": lp.sparsity, "collapsed": lp.collapsed} for lp in plan.layers],
            "collapsed": list(plan.collapsed),
            "collapse_point": plan.collapse_point,
            "collapse_layer": plan.collapse_layer,
            "recipe": recipe.to_dict(),
        }
        if plan.note or prepared.note:
            result["note"] = " ".join(filter(None, [prepared.note, plan.note]))
        if prepared.nm is not None:
            result["nm"] = {"n": prepared.nm[0], "m": prepared.nm[1]}
        if args.criterion in ("wanda", "sparsegpt"):
            result["calibration"] = "sequential" if prepared.sequential else "one-pass"
        if plan.collapsed or args.plan_only:
            estimate = pipeline.estimate(prepared, plan)
            result["params"] = {"total": estimate["params_total"], "nonzero": estimate["params_after"],
                                "estimated": True}
            result["flops"] = {"dense": prepared.flops_dense, "effective": estimate["flops_after"], "estimated": True}
            if plan.collapsed:
                result["error"] = (f"not applied: the plan empties {', '.join(plan.collapsed)}; lower the sparsity, "
                                   "use --scope local or --min-keep")
            results.append(result)
            continue
        step = f"[{len(results) + 1}/{len(recipes)} sparsity {recipe.plan.sparsity:g}]"
        pruned = pipeline.apply(model, prepared, plan, progress=progress, in_place=in_place)
        if progress:
            progress(1.0, f"measuring the pruned copy at {recipe.plan.sparsity:g}")
        if task_name == "fidelity" and dense_outputs is None:
            dense_outputs = tasks.reference_outputs(model, dataset, "test")
        with ctrl_c_cancels() as cancel:
            m = pipeline.measure_run(model, pruned, dataset, recipe.measure, base_task_value=base_value,
                                     reference_outputs=dense_outputs, cancel=cancel, base_figures=base_figures,
                                     peak_memory=False,
                                     progress=(lambda fraction, line: progress(fraction, f"{step} {line}"))
                                     if progress else None)
        if cancel.is_set():
            result["cancelled"] = ("interrupted: " + (f"{m['cancelled']} and later stages not measured" if m["cancelled"]
                                                      else "this sparsity was measured in full") +
                                   "; later sparsities not started")
        result["params"] = {"total": m["params_total"], "nonzero": m["params_nonzero"],
                            "dense_total": m["baseline_params_total"]}
        result["flops"] = {"dense": m["flops_dense"], "effective": m["flops_effective"],
                           "base": m["baseline_flops_effective"], "per": "input"}
        result["size_bytes"] = {"raw": m["size_raw_bytes"], "compressed": m["size_compressed_bytes"]}
        if m["accuracy"] is not None:
            result["accuracy"] = {"base": m["base_accuracy"], "pruned": m["accuracy"], "split": "test",
                                  "fine_tuned": False}
        result["task"] = {key: m["task"][key] for key in ("name", "measure", "base", "pruned", "higher_is_better",
                                                          "tokens") if key in m["task"]}
        if reused:
            result["base_cached"] = BASE_CACHED
        if "measures" in m["task"]:
            result["task"]["measures"] = m["task"]["measures"]
        result["speedup"] = {"flops": m["speedup_flops"], "measured": m["speedup_measured"],
                             "measured_interval": m["speedup_interval"], "noisy": m["speedup_noisy"],
                             "noise": m["speedup_noise"]}
        if m.get("semi_structured") is not None:  # a 2:4 model: timed with sparse kernels on a capable GPU, or why not
            result["semi_structured"] = m["semi_structured"]
        if recipe.measure.latency and m["latency_ms"] is not None:
            result["latency_ms"] = {"dense": m["baseline_latency_ms"], "pruned": m["latency_ms"], "device": m["device"],
                                    "batch": m["batch"], "threads": m["threads"], "layout": m["layout"],
                                    "dense_interval": m["timing"]["baseline_interval_ms"],
                                    "pruned_interval": m["latency_interval_ms"], "pairs": m["timing"]["pairs"],
                                    "seconds": m["timing"]["seconds"], "load": m["timing"]["load"],
                                    "threads_note": m["timing"]["threads_note"]}
        if args.save:
            path = _save_path(args.save, recipe.plan.sparsity, len(recipes) > 1)
            _save(pruned, path, arch=arch, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                  metadata={"plan": plan.to_dict() if len(plan.layers) < 500 else None,
                            "recipe": recipe.to_dict(), "format": SAVE_FORMAT})
            result["saved"] = str(path)
        results.append(result)
        if result.get("cancelled"):  # Ctrl-C: the sparsities after this one are not started
            break
    return results


BASE_CACHED = ("base figures (task metric, parameters, FLOPs, compressed size) read from the cache: same folder "
               "contents and settings (--fresh-base measures them again)")


def _base_figures(args, model, dataset, spec: MeasureSpec, task_name: str, progress) -> tuple:
    """(task value, `measure.measure_baseline` figures, reused?) of the dense model, measured once.

    For an ``hf:`` folder they are read from `explorer.basecache` when the same folder contents were
    measured with the same settings before, and stored there otherwise.
    """
    example = dataset.example_input(spec.batch)
    name = basecache.key(args.model, data_file=args.data_file, data=args.data, seed=args.seed, task=task_name,
                         eval_tokens=spec.token_budget, example=list(example[:1].shape))
    cached = None if args.fresh_base else basecache.load(name)
    if cached is not None and isinstance(cached.get("figures"), dict):
        return cached.get("task"), cached["figures"], True
    if progress:
        progress(0.0, "measuring the base model (task metric, size, FLOPs)")
    follow = (lambda fraction, text: progress(fraction, f"measuring the base model: {text}")) if progress else None
    value = (tasks.evaluate_task(model, dataset, task=task_name, max_tokens=spec.token_budget, progress=follow)["value"]
             if task_name != "fidelity" else None)
    figures = measure.measure_baseline(model, example)
    basecache.store(name, {"task": value, "figures": figures})
    return value, figures, False


def _stage_printer():
    """``progress(fraction, text)`` that prints ``[seconds] text`` to stderr when the text changes stage
    (at most one line a second within a stage), so a long prune shows where it is."""
    import time

    started, last = time.perf_counter(), {"text": None, "at": -1.0}

    def progress(fraction: float, text: str) -> None:
        now = time.perf_counter() - started
        stage = text.split(":")[0]
        if stage != last["text"] or now - last["at"] >= 1.0 or fraction >= 1.0:
            print(f"[{now:7.1f} s] {text} ({fraction:.0%})", file=sys.stderr, flush=True)
            last.update(text=stage, at=now)
    return progress


def _print_human(command: str, results: list[dict]) -> None:
    for result in results:
        if command == "restore":
            print(result["line"])
            continue
        if command == "deploy":
            _print_deploy(result)
            continue
        if command in ("sensitivity", "sweep", "suggest"):
            print({"sensitivity": sensitivity.format_human, "sweep": sweep.format_human,
                   "suggest": suggest.format_human}[command](result))
            continue
        if command == "run":
            m, recipe = result["metrics"], result["recipe"]
            source, scoring, plan = recipe["model"], recipe["scoring"], recipe["plan"]
            budget = (recipe["budget"] or {}).get("epochs") or (recipe["finetune"] or {}).get("epochs") or 0
            print(f"{source['source']} on {source['data'] or 'its usual dataset'}: {scoring['structure']} "
                  f"{scoring['criterion']} {plan['scope']} {plan['sparsity']:.0%}, method {recipe['method']['name']}, "
                  f"{budget} training epochs; reached {m['sparsity_actual']:.1%}")
            task = m.get("task") or {"name": "accuracy", "measure": "accuracy", "base": m["base_accuracy"],
                                     "pruned": m["accuracy"]}
            quality = (f"test accuracy {task['base']:.1%} -> {task['pruned']:.1%}" if task["name"] == "accuracy"
                       else f"test {task['name']} ({task['measure']}) {task['base']:.4g} -> {task['pruned']:.4g}")
            print(f"  {quality}; params {m['params_nonzero']:,} "
                  f"non-zero of {m['baseline_params_total']:,}; speed-up FLOPs {m['speedup_flops']:.2f}x"
                  + (f", measured {timing.speedup_text(m)} ({m['device']}, batch {m['batch']}, "
                     f"{m['threads']} threads, {m['layout']})"
                     if m.get("speedup_measured") else ""))
            if note := timing.timing_note(m):
                print(f"  {note}")
            for row in (m.get("runtimes") or {}).get("rows", []):
                print(_runtime_line(row))
            continue
        if result.get("stream"):
            from explorer import stream

            print(stream.format_human(result))
            continue
        if command == "inspect":
            print(f"{'layer':32s} {'kind':8s} {'count':>9s} {'mean|w|':>9s} {'std':>9s} {'zeros':>6s}")
            for layer in result["layers"]:
                print(f"{layer['name']:32s} {layer['kind']:8s} {layer['count']:9d} {layer['mean_abs']:9.4f} "
                      f"{layer['std']:9.4f} {layer['zeros_fraction']:6.1%}")
            if "compat" in result:
                print("compatibility:")
                for line in compat.summary_lines(result["compat"]):
                    print(f"  {line}")
            continue
        point = result["collapse_point"]
        calibrated = f", {result['calibration']} calibration" if "calibration" in result else ""
        print(f"sparsity {result['sparsity']:.1%} ({result['scope']} {result['criterion']} {result['structure']}"
              f"{calibrated}); "
              f"collapse point {'none' if point is None else f'{point:.1%}'}")
        for layer in result["layers"]:
            flag = "  COLLAPSED" if layer["collapsed"] else ""
            print(f"  {layer['name']:32s} kept {layer['kept']:>9d}/{layer['total']:<9d} {layer['sparsity']:6.1%}{flag}")
        print(f"  params {result['params']['nonzero']:,} non-zero of {result['params']['total']:,}; "
              f"FLOPs {result['flops']['effective']:,}")
        if "accuracy" in result:
            print(f"  test accuracy {result['accuracy']['base']:.1%} -> {result['accuracy']['pruned']:.1%} "
                  "(no fine-tune)")
        elif "task" in result:
            task = result["task"]
            label = task["name"] if task["name"] == task["measure"] else f"{task['name']} ({task['measure']})"
            scored = (f" {tasks.tokens_phrase(task['tokens'], hint='--eval-tokens 0 for all')}" if "tokens" in task
                      else "")
            print(f"  test {label} {task['base']:.4g} -> {task['pruned']:.4g} (no fine-tune){scored}")
        if "base_cached" in result:
            print(f"  {result['base_cached']}")
        if "latency_ms" in result:
            lat, measured = result["latency_ms"], _as_metrics(result)
            print(f"  latency {lat['dense']:.3f} -> {lat['pruned']:.3f} ms ({lat['device']}, batch {lat['batch']}, "
                  f"{lat['threads']} threads, {lat['layout']}); speed-up FLOPs {result['speedup']['flops']:.2f}x, "
                  f"measured {timing.speedup_text(measured)}")
            if note := timing.timing_note(measured):
                print(f"  {note}")
        if "semi_structured" in result:
            print(f"  {semistructured.describe(result['semi_structured'])}")
        if "error" in result:
            print(f"  {result['error']}")


def _as_metrics(result: dict) -> dict:
    """The measured speed-up of a ``prune`` result in the shape `explorer.timing`'s texts read."""
    speedup, latency = result["speedup"], result.get("latency_ms") or {}
    return {"speedup_measured": speedup["measured"], "speedup_interval": speedup.get("measured_interval"),
            "speedup_noisy": speedup.get("noisy"), "speedup_noise": speedup.get("noise"),
            "timing": {"pairs": latency.get("pairs"), "seconds": latency.get("seconds"),
                       "threads_note": latency.get("threads_note")}}


@contextmanager
def ctrl_c_cancels():
    """A `threading.Event` that Ctrl-C sets instead of killing the process, so a measurement stops after its
    current stage and keeps what it finished; a second Ctrl-C quits as usual. Outside the main thread
    (where signals cannot be caught) the event is simply never set."""
    cancel = threading.Event()

    def interrupted(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("interrupted: finishing the current stage and keeping what is done (Ctrl-C again to quit)",
              file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """An ExplorerWarning is one ``warning:`` line on stderr; any other warning is shown as Python shows it."""
    if issubclass(category, ExplorerWarning):
        print(f"warning: {str(message).splitlines()[0]}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default", ExplorerWarning)
        warnings.showwarning = _show_warning
        try:
            for flag in SAVE_FLAGS:
                check_save_path(getattr(args, flag, None), "--" + flag.replace("_", "-"))
            results = {"inspect": cmd_inspect, "prune": cmd_prune, "run": cmd_run,
                       "sensitivity": sensitivity.command, "sweep": sweep.command,
                       "suggest": suggest.command, "deploy": cmd_deploy, "restore": cmd_restore}[args.command](args)
        except ExplorerError as exc:
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: stopped before anything was finished", file=sys.stderr)
            return 130
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        _print_human(args.command, results)
    return 0
