"""Sweeps: one recipe, a grid over any of its fields, every point a stored run.

A grid file is a recipe plus a ``grid:`` mapping from a field to the values it takes; the sweep
runs the product of the lists (every combination), each point with `recipe.run_recipe`, the very
call of ``python -m explorer run``, so a point's numbers are those of running its recipe alone
(same seed, same numbers, on every backend of `explorer.backends`). Each finished point is stored
as a Run carrying the sweep's id and the point's grid coordinates; the Compare page filters by it.
The id is the sweep's name, its start time and a number the store hands out once (``grid (2026-12-06
15:58:38) #7``), so two sweeps started in the same second stay two. A point the store refuses is
kept in one JSON file for the sweep (`explorer.store.keep_runs`), and Ctrl-C or SIGTERM ends the
workers and keeps every point already stored.

Example ``grid.yaml`` (``name`` is optional, the file's stem by default)::

    model: {source: mlp, data: digits}
    scoring: {structure: unstructured}
    measure: {latency: false}
    name: criteria-by-sparsity
    grid:
      criterion: [magnitude, taylor]      # a bare name: the one Recipe field so called (scoring.criterion)
      plan.sparsity: [0.5, 0.8]           # a dotted path: section.field (method.<param> for a method's own)
      seed: [0, 1]                        # a top-level field of the Recipe

A bare name must belong to exactly one part (``epochs`` is budget.epochs and finetune.epochs:
write the one you mean); ``model`` or ``method`` alone take whole parts (``method: [one_shot,
iterative]``). Every point is validated before any runs, and a point whose run fails is stored
with its error while the sweep goes on. A grid holds at most `limits.MAX_GRID_POINTS` points, and
one that names a ``package.module:callable`` factory runs only with ``--trust-factory``.

Measured latency is honest but contended: a point is timed with one thread (the recipe's
``measure.threads`` unless set) while other points run beside it. Compare latencies of one sweep
with each other, or set ``measure: {latency: false}`` (``--no-latency``) and time the chosen
recipes alone with ``python -m explorer run``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import itertools
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explorer import backends, limits
from explorer.errors import ExplorerError
from explorer.recipe import Recipe, named_factories, read_yaml
from explorer.specs import BudgetSpec, MeasureSpec, MethodSpec, ModelSpec, PlanSpec, ScoringSpec
from explorer.train import TrainConfig

MAX_POINTS = 1000  # more needs --yes (yes=True)
SECTIONS = {"model": ModelSpec, "scoring": ScoringSpec, "plan": PlanSpec, "method": MethodSpec, "budget": BudgetSpec,
            "finetune": TrainConfig, "measure": MeasureSpec}
TOP_LEVEL = tuple(f.name for f in dataclasses.fields(Recipe))


@dataclass(frozen=True)
class Point:
    """One combination of the grid: its place (``index``), its coordinates by field path, its Recipe."""

    index: int
    coords: dict[str, Any]
    recipe: Recipe


@dataclass
class Sweep:
    """What a sweep did: one result per finished point (index order) and whether it was cancelled."""

    id: str
    points: int
    results: list[dict] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0
    unsaved: int = 0         # points the store refused: they are in ``kept``
    kept: str | None = None
    store_error: str = ""

    @property
    def failed(self) -> list[dict]:
        return [result for result in self.results if "error" in result]

    @property
    def stored(self) -> int:
        return sum(1 for result in self.results if result.get("run_id"))


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, see `command`) stopped a sweep: its workers are ended, ``sweep`` holds what finished."""

    def __init__(self, sweep: Sweep, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.sweep, self.signal_name = sweep, signal_name


def _section_fields(section: str) -> list[str]:
    if section == "method":
        return ["name"]
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def resolve_field(name: str) -> str:
    """The dotted path a grid key names: ``criterion`` -> ``scoring.criterion``, ``seed`` -> ``seed``.

    A top-level Recipe field (seed, model, method, ...) is itself; any other bare name must be the
    field of exactly one part. A dotted path is checked part by part; ``method.<param>`` is a
    method's own parameter, checked when the points are validated.
    """
    if not isinstance(name, str) or not name.strip():
        raise ExplorerError(f"grid: a field name must be text, got {name!r}.")
    if name in TOP_LEVEL:
        return name
    section, _, rest = name.partition(".")
    if rest:
        if section not in SECTIONS:
            raise ExplorerError(f"grid: '{name}' starts with '{section}', which is no part of a Recipe; "
                                f"parts: {', '.join(SECTIONS)}.")
        field_name = rest.split(".")[0]
        if section != "method" and field_name not in _section_fields(section):
            raise ExplorerError(f"grid: '{section}' has no field '{field_name}'; its fields: "
                                f"{', '.join(_section_fields(section))}.")
        return name
    candidates = [f"{part}.{name}" for part in SECTIONS if name in _section_fields(part)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ExplorerError(f"grid: '{name}' is a field of several parts ({', '.join(candidates)}); "
                            "write the one you mean.")
    every = list(TOP_LEVEL) + [f"{part}.{f}" for part in SECTIONS for f in _section_fields(part)]
    close = difflib.get_close_matches(name, every + [path.split(".")[-1] for path in every], n=3)
    hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
    raise ExplorerError(f"grid: no Recipe has a field '{name}'{hint}; use a field such as sparsity or criterion, "
                        "or a dotted path part.field (method.<param> for a method's own settings).")


def _set(values: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    if len(parts) == 1:
        values[path] = {"name": value} if path == "method" and isinstance(value, str) else value
        return
    target = values
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = dict(target[part]) if isinstance(target.get(part), Mapping) else {}
        target = target[part]
    target[parts[-1]] = value


def _label(coords: Mapping[str, Any]) -> str:
    return ", ".join(f"{path}={value}" for path, value in coords.items())


def expand(values: Mapping[str, Any], *, yes: bool = False) -> tuple[str, list[Point]]:
    """The grid file's content as (name, points): every point validated before any is run.

    ``values`` is the recipe plus ``grid:`` (and optionally ``name:``). Raises ExplorerError for an
    empty grid, a field no Recipe has, more than `MAX_POINTS` points without ``yes``, more than
    `limits.MAX_GRID_POINTS` even with it (counted from the lists' lengths, before any point is
    made), and a value the field refuses, named with its point's coordinates.
    """
    if not isinstance(values, Mapping):
        raise ExplorerError("A grid file is a recipe plus a 'grid:' mapping (YAML or JSON object).")
    values = dict(values)
    grid, name = values.pop("grid", None), str(values.pop("name", "") or "")
    example = "e.g. grid: {criterion: [magnitude, taylor], sparsity: [0.5, 0.8]}"
    if not grid:
        raise ExplorerError(f"The grid is empty: add a 'grid:' mapping from a field to its list of values, {example}.")
    if not isinstance(grid, Mapping):
        raise ExplorerError(f"'grid' must map each field to a list of values, {example}.")
    paths: dict[str, str] = {}
    for key, options in grid.items():
        path = resolve_field(key)
        if path in paths.values():
            raise ExplorerError(f"grid: '{key}' and '{next(k for k, p in paths.items() if p == path)}' are both "
                                f"{path}; list its values once.")
        if not isinstance(options, list):
            raise ExplorerError(f"grid: '{key}' must be a list of values, got {options!r}; {example}.")
        if not options:
            raise ExplorerError(f"The grid is empty along '{key}': give it a non-empty list of values, {example}.")
        paths[key] = path
    count = math.prod(len(options) for options in grid.values())
    if count > limits.MAX_GRID_POINTS:
        raise ExplorerError(f"The grid has {count:,} points, more than the limit of {limits.MAX_GRID_POINTS:,} "
                            "(even with --yes): split it into smaller sweeps.")
    if count > MAX_POINTS and not yes:
        raise ExplorerError(f"The grid has {count:,} points, more than {MAX_POINTS:,}: pass --yes to run them all.")
    base = Recipe.from_dict(values).to_dict() if "model" in values or "model" not in paths.values() else values
    points = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        coords = dict(zip(paths.values(), combo))
        point_values = copy.deepcopy(base)
        for path, value in coords.items():
            _set(point_values, path, value)
        try:
            recipe = Recipe.from_dict(point_values)
        except ExplorerError as exc:
            raise ExplorerError(f"grid point {index + 1} of {count} ({_label(coords)}): {exc}") from None
        points.append(Point(index, coords, recipe))
    return name, points


def load_grid(path: str | Path, *, yes: bool = False) -> tuple[str, list[Point]]:
    """Read and expand a grid file (YAML or JSON); the name defaults to the file's stem."""
    values = read_yaml(path, "Grid")
    name, points = expand(values, yes=yes)
    return name or Path(path).stem, points


def check_factories(points: Sequence[Point], *, trusted: bool, flag: str = "--trust-factory") -> None:
    """Refuse a grid any of whose points names a Python factory (model.source or model.arch) unless ``trusted``.

    A grid file is data from someone else, like a recipe (`explorer.recipe.check_factories`): a
    ``package.module:callable`` in its base recipe or in a grid list is imported, so run, only when the
    person running the sweep passes the flag. Checked for every point before any runs.
    """
    named = list(dict.fromkeys(name for point in points for name in named_factories(point.recipe)))
    if named and not trusted:
        raise ExplorerError(f"The grid names the Python factory {', '.join(repr(n) for n in named)}: importing it "
                            f"runs its code. If you trust it, pass {flag}; a grid file cannot allow it by itself.")


def run_point(recipe: dict) -> dict:
    """Run one point's recipe (in a worker): what ``python -m explorer run --json`` prints, or its error.

    Facts the store needs beside the metrics (architecture, data) come back too; the pruned model does
    not (a sweep stores no weights: replay a point's recipe to get them).
    """
    from explorer.cli import run_summary
    from explorer.recipe import run_recipe

    try:
        outcome = run_recipe(Recipe.from_dict(recipe))
    except ExplorerError as exc:
        return {"recipe": recipe, "error": (str(exc).splitlines() or [""])[0]}
    dataset = outcome["dataset"]
    return {**run_summary(outcome), "arch": outcome["arch"], "dataset": dataset.name,
            "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "cancelled": outcome["cancelled"]}


def _warm_baselines(points: Sequence[Point], threads: int, progress=None) -> None:
    """Train (or find cached) each distinct model once here, so local workers never train one twice at once."""
    from explorer import pipeline
    from explorer.models import ZOO

    seen = set()
    for point in points:
        spec = point.recipe.model
        key = (spec, point.recipe.seed)
        if key in seen or not (spec.baseline and spec.source in ZOO and spec.weights is None):
            continue
        seen.add(key)
        if progress is not None:
            progress(0.0, f"loading {spec.source} (seed {point.recipe.seed}): a baseline is trained once, then cached")
        try:
            with backends.torch_threads(threads):
                pipeline.resolve_model(spec, seed=point.recipe.seed)
        except ExplorerError:
            pass  # the point fails in its worker and is stored with the message


def run_sweep(points: Sequence[Point], *, name: str = "sweep", backend: str = "local", address: str | None = None,
              workers: int | None = None, threads: int = 1, store=None,
              progress: Callable[[float, str], None] | None = None, cancel=None) -> Sweep:
    """Run every point on ``backend`` and store each as a run of one sweep (``store``: a RunStore or None).

    ``progress(fraction, text)`` follows finished points; ``cancel`` (``is_set()``) starts no new
    point, lets the running ones finish and keeps them. A point that fails is stored and returned
    with its ``error``; the rest go on. Results come back in grid order. Once the store refuses a
    point, it and every later point go to one file (``sweep.kept``) instead. A KeyboardInterrupt
    ends the workers and comes out as `SweepInterrupted`, the points stored so far kept.
    """
    from explorer.store import StoreError

    backends.check_backend(backend, address, workers)
    started = time.perf_counter()
    sweep = Sweep(id=_new_id(name, store), points=len(points))
    by_index = {point.index: point for point in points}
    order = [point.index for point in points]
    tasks = [(point.recipe.to_dict(),) for point in points]
    unsaved: list = []
    try:
        if backend == "local" or not address:
            _warm_baselines(points, threads, progress)
        for done, (position, outcome, error) in enumerate(
                backends.run_tasks(run_point, tasks, backend=backend, address=address, workers=workers,
                                   threads=threads, cancel=cancel), start=1):
            point = by_index[order[position]]
            outcome = outcome or {"recipe": point.recipe.to_dict(), "error": error}
            result = {"sweep": sweep.id, "index": point.index, "point": point.coords, "run_id": None, **outcome}
            note = ""
            if store is not None:
                run = _run(point, outcome, sweep.id)
                try:
                    if unsaved:
                        raise StoreError(sweep.store_error)
                    result["run_id"] = store.save(run, keep=False).id
                except StoreError as exc:
                    unsaved.append(run)
                    sweep.store_error, sweep.unsaved = sweep.store_error or str(exc), len(unsaved)
                    note = _keep(sweep, unsaved, store)
                    result["kept"] = sweep.kept  # the file that holds the point instead of the store (or None)
            for key in ("arch", "input_shape", "num_classes", "dataset"):
                result.pop(key, None)
            sweep.results.append(result)
            if progress is not None:
                progress(done / len(points), f"point {done}/{len(points)} ({_label(point.coords)})"
                         + (f": failed, {result['error']}" if "error" in result else "") + note)
    except KeyboardInterrupt as exc:
        sweep.cancelled, sweep.seconds = True, time.perf_counter() - started
        sweep.results.sort(key=lambda result: result["index"])
        raise SweepInterrupted(sweep, str(exc) or "SIGINT") from None
    sweep.results.sort(key=lambda result: result["index"])
    sweep.cancelled = bool(cancel is not None and cancel.is_set() and len(sweep.results) < len(points))
    sweep.seconds = time.perf_counter() - started
    return sweep


def _new_id(name: str, store) -> str:
    """The store's unique sweep id; without a store (or when it refuses) the start time and a random suffix."""
    from explorer.store import StoreError

    if store is not None:
        try:
            return store.new_sweep(name)
        except StoreError:
            pass  # the first point meets the same error and keeps the points in a file
    return f"{name} ({time.strftime('%Y-%m-%d %H:%M:%S')}) #{uuid.uuid4().hex[:8]}"


def _keep(sweep: Sweep, runs: list, store) -> str:
    """Rewrite the sweep's file of the points the store refused; what to tell the user (once), or ""."""
    from explorer.store import StoreError, keep_runs

    stem = "sweep-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in sweep.id)[:80]
    try:
        sweep.kept = str(keep_runs(runs, store.root, stem))
    except StoreError as lost:  # no file either: the results still come back (and the CLI prints them)
        sweep.kept = None
        if lost.args[0] not in sweep.store_error:
            sweep.store_error += f" {lost}"
            return f"; not in the run store nor in a file: {lost}"
        return ""
    return f"; not in the run store, kept in {sweep.kept}" if len(runs) == 1 else ""


def _run(point: Point, outcome: dict, sweep_id: str):
    """The stored Run of one point: its recipe, metrics and curves, or (failed) its error."""
    from explorer.store import Run

    history = outcome.get("history") or []
    settings = {"sweep": {"id": sweep_id, "index": point.index, "point": point.coords}}
    if "error" in outcome:
        settings["error"] = outcome["error"]
    else:
        settings.update(arch=outcome["arch"], input_shape=outcome["input_shape"], num_classes=outcome["num_classes"],
                        cancelled=outcome["cancelled"])
        if history:
            settings["finetune"] = {"epochs_done": len(history), "cancelled": outcome["cancelled"]}
    return Run.from_recipe(point.recipe, model_name=point.recipe.model.source,
                           dataset=outcome.get("dataset") or point.recipe.model.data or "", settings=settings,
                           metrics=outcome.get("metrics") or {}, history=history,
                           trajectory=outcome.get("trajectory") or [], stage=1 if history else 0, sweep=sweep_id)


# --- sensitivity scans on the same backends -------------------------------------------------------


def _scan_share(model, dataset, scoring, prepared, units, options):
    from explorer.sensitivity import scan

    return scan(model, dataset, scoring, prepared=prepared, units=units, **options)


def scan_on(model, dataset, scoring, *, backend: str = "local", address: str | None = None,
            workers: int | None = None, threads: int = 1, seed: int = 0,
            progress: Callable[[float, str], None] | None = None, cancel=None, **options):
    """`sensitivity.scan` with its units split across workers: the merged Scan is the one-process scan's.

    The scores are computed once here (with ``threads`` threads, as the workers run) and shipped with
    the model; each worker scans a share of the units, and the cells come back in unit order with
    the robust -> fragile order recomputed over all of them. ``options`` are `scan`'s (sparsities,
    split, samples, latency). A cancel starts no new share; the scan keeps the shares finished.
    """
    from explorer import pipeline
    from explorer.sensitivity import check_samples, check_sparsities, robust_order

    backends.check_backend(backend, address, workers)
    check_sparsities(options.get("sparsities", (0.5,)))
    check_samples(options.get("samples"))
    started = time.perf_counter()
    with backends.torch_threads(threads):
        prepared = pipeline.prepare(model, scoring.validate(), dataset=dataset, seed=seed)
    names = list(prepared.names)
    shares = min(len(names), workers or backends.default_workers()) or 1
    size = math.ceil(len(names) / shares) if names else 1
    tasks = [(model, dataset, scoring, prepared, names[start:start + size], options)
             for start in range(0, max(1, len(names)), size)]
    parts: dict[int, Any] = {}
    for position, part, error in backends.run_tasks(_scan_share, tasks, backend=backend, address=address,
                                                    workers=workers, threads=threads, cancel=cancel):
        if error is not None:
            raise ExplorerError(f"A share of the scan failed: {error}")
        parts[position] = part
        if progress is not None:
            progress(len(parts) / len(tasks), f"{len(parts)}/{len(tasks)} shares of the units scanned")
    if not parts:
        raise ExplorerError("The scan was cancelled before any unit was scanned.")
    first = parts[min(parts)]
    cells = [cell for position in sorted(parts) for cell in parts[position].cells]
    return dataclasses.replace(first, cells=cells, order=robust_order(cells, first.sparsities, first.units),
                               cancelled=len(parts) < len(tasks) or any(p.cancelled for p in parts.values()),
                               seconds=time.perf_counter() - started)


# --- headless: python -m explorer sweep ------------------------------------------------------------


def add_backend_args(parser: argparse.ArgumentParser, default: str | None = "local") -> None:
    """--backend, --address, --workers: where the work runs (shared with ``sensitivity``)."""
    from explorer.cli import _positive  # cli imports this module: import its helpers late

    parser.add_argument("--backend", choices=list(backends.BACKENDS), default=default,
                        help="local: a process pool on this machine; ray: a Ray cluster "
                             f"(default: {default or 'this process alone'})")
    parser.add_argument("--address", help="the Ray cluster's address (host:port or ray://host:port); "
                                           "without it --backend ray starts a local Ray instance")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="how many calls run at once (default: the CPU count; 1 runs them in this process)")


def add_command(sub, model_args=None) -> argparse.ArgumentParser:
    """Register ``sweep`` on the CLI's subparsers (a grid file holds the model: no model flags)."""
    parser = sub.add_parser("sweep", help="run a grid of recipes (criteria x sparsities x methods x seeds ...)")
    parser.add_argument("--grid", required=True, help="YAML/JSON: a recipe plus grid: {field: [values]}")
    add_backend_args(parser)
    parser.add_argument("--name", help="the sweep's name in the run store (default: the grid's name or file stem)")
    parser.add_argument("--yes", action="store_true", help=f"run a grid of more than {MAX_POINTS:,} points "
                                                                 f"(at most {limits.MAX_GRID_POINTS:,})")
    parser.add_argument("--no-latency", action="store_true", help="skip latency measurement in every point")
    parser.add_argument("--trust-factory", action="store_true",
                        help="allow the grid to import and call the package.module:callable factories it names "
                             "(importing runs their code; a grid file itself cannot allow it)")
    parser.add_argument("--json", action="store_true", help="one JSON line per point")
    return parser


def command(args) -> list[dict]:
    """Validate the whole grid (factories it names need --trust-factory) and the store, then run it.

    Returns one dict per point (grid order); progress goes to stderr.

    SIGTERM is turned into a KeyboardInterrupt while the sweep runs, so both end the workers; the
    command then says in one line how many points were stored and exits 128 + the signal's number.
    """
    import sys

    from explorer.store import RunStore

    backends.check_backend(args.backend, args.address, args.workers)
    name, points = load_grid(args.grid, yes=args.yes)
    check_factories(points, trusted=args.trust_factory)
    if args.no_latency:
        points = [dataclasses.replace(p, recipe=p.recipe.replace(measure={"latency": False})) for p in points]
    store = RunStore()
    store.check_writable()  # before any point runs: a read-only or damaged store is one line, not lost work
    def progress(fraction: float, text: str) -> None:
        print(f"sweep {fraction:4.0%} {text}", file=sys.stderr)

    try:
        with _sigterm_interrupts():
            sweep = run_sweep(points, name=args.name or name, backend=args.backend, address=args.address,
                              workers=args.workers, store=store, progress=progress)
    except SweepInterrupted as stop:
        done = stop.sweep
        try:  # the store is the truth: a point saved just as the signal came is counted too
            stored = len(store.list(sweep=done.id))
        except ExplorerError:
            stored = done.stored
        kept = f"; {done.unsaved} more kept in {done.kept}" if done.kept else ""
        print(f"sweep '{done.id}' stopped by {stop.signal_name}: {stored} of {done.points} points stored in "
              f"{store.db_path}{kept}; the workers are ended.", file=sys.stderr)
        raise SystemExit(128 + getattr(signal, stop.signal_name, signal.SIGINT)) from None
    if sweep.unsaved:
        where = f"they are kept in {sweep.kept}" if sweep.kept else "no file could hold them either: only this output"
        print(f"sweep: {sweep.unsaved} of {sweep.points} points are not in the run store; {where}. "
              f"The store said: {sweep.store_error}", file=sys.stderr)
    return sweep.results


@contextmanager
def _sigterm_interrupts():
    """While inside, SIGTERM raises KeyboardInterrupt('SIGTERM') in the main thread (in another thread: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def format_human(result: dict) -> str:
    """One line per point: its coordinates, then what came out or why it failed."""
    head = f"#{result['index'] + 1} {_label(result['point'])}"
    head += f" (run {result['run_id']})" if result["run_id"] else ""
    if "error" in result:
        return f"{head}: failed: {result['error']}"
    m = result["metrics"]
    task = m.get("task") or {"name": "accuracy", "base": m.get("base_accuracy"), "pruned": m.get("accuracy")}
    quality = (f"accuracy {task['pruned']:.1%}" if task["name"] == "accuracy"
               else f"{task['name']} {task['pruned']:.4g}")
    return (f"{head}: {quality}, sparsity {m['sparsity_actual']:.1%}, params {m['params_nonzero']:,} non-zero, "
            f"speed-up FLOPs {m['speedup_flops']:.2f}x")
