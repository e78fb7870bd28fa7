"""Runs that survive a restart: a SQLite table of settings and metrics, weights as files.

A *run* is one finished stage of an experiment (a prune, a fine-tune after it): its full
Recipe (``Recipe.from_dict(run.recipe)`` replays it), which stage of the recipe's method it
records, what came out (accuracy, parameters, FLOPs, size, measured latency, speed-ups), the
training curve and the trajectory of a method over time, and the sweep it is a point of (``sweep``,
empty for a run of its own; the point's grid coordinates are in ``settings["sweep"]``). Model,
dataset, structure, criterion, scope and sparsity are also kept as columns, copied from the recipe,
for listing.
Databases written before runs kept their recipe are migrated when opened (new columns, empty).
The database lives in ``$PRUNING_EXPLORER_DATA`` (default ``~/.local/share/pruning-explorer``)
with one weights file per run in ``weights/`` beside it.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from torch import nn

from explorer.errors import ExplorerError
from explorer.models import save_model


@dataclass
class Run:
    """One stored result: settings in, metrics out."""

    model_name: str
    dataset: str
    structure: str
    criterion: str
    scope: str
    sparsity: float
    settings: dict = field(default_factory=dict)   # facts beside the recipe: arch, input shape, fine-tune outcome
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    name: str = ""
    id: int | None = None
    created: float = 0.0
    recipe: dict = field(default_factory=dict)     # Recipe.to_dict(): replays the run
    stage: int = 0                                 # which stage of the recipe's method (one_shot: 0 pruned, 1 fine-tuned)
    trajectory: list = field(default_factory=list)  # per-step or per-round points of a method over time
    sweep: str = ""                                # the sweep (explorer.sweep) the run is a point of; "" for none

    @classmethod
    def from_recipe(cls, recipe, *, model_name: str, dataset: str, **values) -> "Run":
        """A run whose listing columns are read from ``recipe`` (an `explorer.recipe.Recipe`)."""
        return cls(model_name=model_name, dataset=dataset, structure=recipe.scoring.structure,
                   criterion=recipe.scoring.criterion, scope=recipe.plan.scope, sparsity=float(recipe.plan.sparsity),
                   recipe=recipe.to_dict(), **values)

    def to_dict(self) -> dict:
        return asdict(self)


def _default_name(run: Run) -> str:
    """``run 7: mlp unstructured magnitude global 80% + fine-tune 2 ep``: the run's own number, what it did."""
    method = (run.recipe.get("method") or {}).get("name", "one_shot")
    finetune = run.settings.get("finetune") or {}
    name = f"run {run.id}: {run.model_name} {run.structure} {run.criterion} {run.scope} {run.sparsity:.0%}"
    if method != "one_shot":
        name += f", {method}"
    if finetune:
        name += f" + fine-tune {finetune.get('epochs_done', 0)} ep"
    if finetune.get("cancelled") or run.settings.get("cancelled"):
        name += " (cancelled)"
    if run.settings.get("error"):  # a sweep's point that failed: its error is in settings
        name += " (failed)"
    return name


def data_dir() -> Path:
    root = os.environ.get("PRUNING_EXPLORER_DATA") or Path.home() / ".local" / "share" / "pruning-explorer"
    return Path(root)


_COLUMNS = ("id", "name", "created", "model_name", "dataset", "structure", "criterion", "scope", "sparsity",
            "settings", "metrics", "history", "recipe", "stage", "trajectory", "sweep")
_JSON_COLUMNS = {"settings": "{}", "metrics": "{}", "history": "[]", "recipe": "{}", "trajectory": "[]"}
# Columns added after the first release, with their SQL type: older databases get them on open.
_ADDED_COLUMNS = {"recipe": "TEXT", "stage": "INTEGER NOT NULL DEFAULT 0", "trajectory": "TEXT",
                  "sweep": "TEXT NOT NULL DEFAULT ''"}


class RunStore:
    """SQLite-backed list of runs; every call opens its own connection (safe across sessions)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "weights").mkdir(exist_ok=True)
        self.db_path = self.root / "runs.sqlite"
        with self._connect() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, created REAL NOT NULL,
                model_name TEXT, dataset TEXT, structure TEXT, criterion TEXT, scope TEXT, sparsity REAL,
                settings TEXT, metrics TEXT, history TEXT)""")
            present = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.db_path, timeout=10)
        except sqlite3.Error as exc:
            raise ExplorerError(f"Cannot open the run database at {self.db_path}: {exc}. "
                                "Set PRUNING_EXPLORER_DATA to a writable folder.") from exc

    def weights_path(self, run_id: int) -> Path:
        return self.root / "weights" / f"run-{run_id}.pt"

    def save(self, run: Run, model: nn.Module | None = None, *, input_shape=None, num_classes=None) -> Run:
        """Store a run (and its pruned weights, when given); returns it with id and time set."""
        run.created = run.created or time.time()
        with self._connect() as db:
            cursor = db.execute(
                f"INSERT INTO runs ({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})",
                (run.name or "", run.created, run.model_name, run.dataset, run.structure, run.criterion, run.scope,
                 float(run.sparsity), json.dumps(run.settings), json.dumps(run.metrics), json.dumps(run.history),
                 json.dumps(run.recipe), int(run.stage), json.dumps(run.trajectory), run.sweep or ""))
            run.id = int(cursor.lastrowid)
            if not run.name:
                run.name = _default_name(run)
                db.execute("UPDATE runs SET name = ? WHERE id = ?", (run.name, run.id))
        if model is not None:
            save_model(model, self.weights_path(run.id), arch=run.settings.get("arch", run.model_name),
                       input_shape=input_shape or run.settings.get("input_shape"),
                       num_classes=num_classes or run.settings.get("num_classes"), metadata={"run": run.id})
        return run

    def _row(self, row) -> Run:
        values = dict(zip(_COLUMNS, row))
        for key, empty in _JSON_COLUMNS.items():
            values[key] = json.loads(values[key] or empty)
        values["stage"] = int(values["stage"] or 0)
        values["sweep"] = values["sweep"] or ""
        return Run(**values)

    def list(self, *, sweep: str | None = None) -> list[Run]:
        """Every run in order of creation, or (``sweep``) only the points of that sweep."""
        query, values = f"SELECT {', '.join(_COLUMNS)} FROM runs", ()
        if sweep is not None:
            query, values = query + " WHERE sweep = ?", (sweep,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", values).fetchall()
        return [self._row(r) for r in rows]

    def sweeps(self) -> list[str]:
        """The sweeps that have runs in the store, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT sweep, MIN(id) FROM runs WHERE sweep != '' GROUP BY sweep ORDER BY 2").fetchall()
        return [row[0] for row in rows]

    def get(self, run_id: int) -> Run:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        if row is None:
            raise ExplorerError(f"There is no run {run_id}; it may have been deleted.")
        return self._row(row)

    def rename(self, run_id: int, name: str) -> Run:
        name = name.strip()
        if not name:
            raise ExplorerError("A run name cannot be empty.")
        self.get(run_id)
        with self._connect() as db:
            db.execute("UPDATE runs SET name = ? WHERE id = ?", (name, int(run_id)))
        return self.get(run_id)

    def delete(self, run_id: int) -> None:
        self.get(run_id)
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (int(run_id),))
        self.weights_path(run_id).unlink(missing_ok=True)

    def export(self, run_id: int) -> bytes:
        """A zip with the pruned model (if stored) and the run's settings and metrics as JSON and YAML."""
        run = self.get(run_id)
        description = run.to_dict()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("run.json", json.dumps(description, indent=2))
            archive.writestr("run.yaml", yaml.safe_dump(description, sort_keys=False))
            if self.weights_path(run_id).exists():
                archive.write(self.weights_path(run_id), "model.pt")
        return buffer.getvalue()
