"""Runs that survive a restart: a SQLite table of settings and metrics, weights as files.

A *run* is one finished stage of an experiment (a prune, a fine-tune after it): its full
Recipe (``Recipe.from_dict(run.recipe)`` replays it), which stage of the recipe's method it
records, what came out (accuracy, parameters, FLOPs, size, measured latency, speed-ups), the
training curve and the trajectory of a method over time, and the sweep it is a point of (``sweep``,
empty for a run of its own; the point's grid coordinates are in ``settings["sweep"]``). Model,
dataset, structure, criterion, scope and sparsity are also kept as columns, copied from the recipe,
for listing.
Databases written before runs kept their recipe are migrated when opened (new columns, empty), and
gain the table that numbers sweeps (`RunStore.new_sweep`), so two sweeps never share an id.
The database lives in ``$PRUNING_EXPLORER_DATA`` (default ``~/.local/share/pruning-explorer``)
with one weights file per run in ``weights/`` beside it.

Several writers share it (the app's sessions, a sweep, a second sweep): the database runs in WAL
mode with a busy timeout, so a writer waits for another instead of failing. Every sqlite error
becomes a `StoreError` that names the file and what to do, and a run the database refuses is
never dropped: it is written to a JSON file (`keep_runs`) that the message names.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
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


BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer (a sweep, another session) before failing
_COLUMNS = ("id", "name", "created", "model_name", "dataset", "structure", "criterion", "scope", "sparsity",
            "settings", "metrics", "history", "recipe", "stage", "trajectory", "sweep")
_JSON_COLUMNS = {"settings": "{}", "metrics": "{}", "history": "[]", "recipe": "{}", "trajectory": "[]"}
# Columns added after the first release, with their SQL type: older databases get them on open.
_ADDED_COLUMNS = {"recipe": "TEXT", "stage": "INTEGER NOT NULL DEFAULT 0", "trajectory": "TEXT",
                  "sweep": "TEXT NOT NULL DEFAULT ''"}


class StoreError(ExplorerError):
    """The run database refused a read or a write; the message names the file and what to do.

    An `ExplorerError`, so pages show it with ``st.error`` and the CLI prints it on one line. ``kept``
    is the file the refused run went to instead (`RunStore.save`), or None.
    """

    def __init__(self, message: str, kept: Path | None = None):
        super().__init__(message)
        self.kept = kept


def _explain(exc: sqlite3.Error, path: Path) -> str:
    """One line for a sqlite error: what is wrong with the file at ``path`` and what the user can do."""
    code, text = getattr(exc, "sqlite_errorname", "") or "", str(exc)
    elsewhere = "or set PRUNING_EXPLORER_DATA to another folder"
    if code in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in text or "malformed" in text:
        return (f"The run store {path} is damaged or not a SQLite database ({text}): move it away (a new, empty "
                f"store is made in its place) {elsewhere}.")
    if code.startswith("SQLITE_READONLY") or "readonly" in text:
        return (f"The run store {path} is read-only ({text}): fix the permissions of the file and its folder "
                f"{elsewhere}.")
    if code.startswith("SQLITE_BUSY") or "locked" in text:
        return (f"The run store {path} stayed locked by another writer for {BUSY_TIMEOUT_S:g} s ({text}): let the "
                f"other sweep or session finish and try again, {elsewhere}.")
    if code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return (f"Cannot open the run store {path} ({text}): it must be a file in a folder you can write; "
                f"fix that {elsewhere}.")
    if code == "SQLITE_FULL" or "disk is full" in text:
        return f"The disk holding the run store {path} is full: free some space {elsewhere}."
    return f"The run store {path} failed ({text}); if this persists, move the file away {elsewhere}."


def keep_runs(runs: list[Run], folder: Path, stem: str, model: nn.Module | None = None, **weights) -> Path:
    """Write runs the database refused to ``folder/unsaved/<stem>.json`` (else the temp folder); returns the file.

    The file is a JSON list of `Run.to_dict` (``Run(**entry)`` rebuilds one, `RunStore.save` stores it
    again); ``model``'s weights go beside it as ``<stem>.pt``. It is written whole and then renamed,
    so a caller may rewrite it after every point (a sweep does) and a kill never leaves half a file.
    """
    payload = json.dumps([run.to_dict() for run in runs], indent=1)
    tried = []
    for place in (folder / "unsaved", Path(tempfile.gettempdir()) / "pruning-explorer-unsaved"):
        path = place / f"{stem}.json"
        try:
            place.mkdir(parents=True, exist_ok=True)
            _write_whole(path, payload)
        except OSError as exc:
            tried.append(f"{path} ({exc.strerror or exc})")
            continue
        if model is not None:
            try:
                save_model(model, path.with_suffix(".pt"), **weights)
            except (OSError, RuntimeError):  # torch reports a failed write as RuntimeError: the run itself is kept
                pass
        return path
    raise StoreError(f"Could not keep the result in a file either: {'; '.join(tried)}.")


def _write_whole(path: Path, payload: str) -> None:
    """``payload`` into ``path`` through a renamed partial file: a kill never leaves half of it."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        partial.write_text(payload)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read_kept(path: Path) -> list[Run]:
    """The runs of a file `keep_runs` wrote; anything else is one line saying what the file should be."""
    what = f"{path} is not a file of kept runs (a JSON list of runs, as the app and sweeps write to unsaved/)"
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExplorerError(f"There is no file {path}; `python -m explorer restore` with no file restores "
                            "every file in the store's unsaved/ folder.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExplorerError(f"{what}: {getattr(exc, 'strerror', None) or exc}.") from None
    known = {f.name for f in fields(Run)}
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"model_name", "dataset"} <= set(e)
                                                and set(e) <= known for e in entries):
        raise ExplorerError(f"{what}.")
    try:
        return [Run(**entry) for entry in entries]
    except TypeError as exc:
        raise ExplorerError(f"{what}: {exc}.") from None


def _schema(db) -> tuple[set[str], set[str]]:
    """The tables of the database and the columns of its ``runs`` table."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return tables, {row[1] for row in db.execute("PRAGMA table_info(runs)")}


def _schema_complete(tables: set[str], columns: set[str]) -> bool:
    return {"runs", "sweeps"} <= tables and set(_ADDED_COLUMNS) <= columns


def _create_or_migrate(db, tables: set[str], columns: set[str]) -> None:
    """Create what a new database lacks, add the columns an older one lacks, and the table numbering sweeps."""
    if "runs" not in tables:
        db.execute("""CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, created REAL NOT NULL,
            model_name TEXT, dataset TEXT, structure TEXT, criterion TEXT, scope TEXT, sparsity REAL,
            settings TEXT, metrics TEXT, history TEXT)""")
    for column, kind in _ADDED_COLUMNS.items():
        if column not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
    if "sweeps" not in tables:  # hands out sweep numbers, so two sweeps never share an id
        db.execute("CREATE TABLE sweeps (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
                   "created REAL NOT NULL)")


class RunStore:
    """SQLite-backed list of runs; every call opens its own connection (safe across sessions and processes).

    Nothing is touched until the first call, so building one never fails: a missing folder, a damaged
    or read-only file shows up as a `StoreError` from the call that needs it.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.db_path = self.root / "runs.sqlite"
        self._ready = False
        self._unmigrated: StoreError | None = None

    def _prepare(self) -> None:
        """Create the folders and the tables, migrate an older database, switch it to WAL (once per store)."""
        try:
            (self.root / "weights").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the run store's folder {self.root} ({exc.strerror or exc}): "
                             "set PRUNING_EXPLORER_DATA to a folder you can write.") from None
        with self._open() as db:
            tables, columns = _schema(db)
        if not _schema_complete(tables, columns):  # write only when something is missing: a read-only store lists
            try:
                with self._open() as db:
                    db.execute("BEGIN IMMEDIATE")  # read again under the write lock: another process may migrate
                    _create_or_migrate(db, *_schema(db))
            except StoreError as exc:
                if "runs" not in tables or not set(_ADDED_COLUMNS) <= columns:
                    raise
                self._unmigrated = exc  # only the sweeps table is missing (an older, read-only store): runs list
        try:  # WAL lets the app read while a sweep writes; a read-only file keeps the mode it has
            with self._open() as db:
                db.execute("PRAGMA journal_mode=WAL")
        except StoreError:
            pass
        self._ready = True

    @contextmanager
    def _open(self):
        """One connection, committed (or rolled back) and closed; any sqlite error becomes a one-line StoreError."""
        try:
            db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S)
            try:
                with db:
                    yield db
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreError(_explain(exc, self.db_path)) from None

    @contextmanager
    def _connect(self):
        if not self._ready:
            self._prepare()
        with self._open() as db:
            yield db

    def weights_path(self, run_id: int) -> Path:
        return self.root / "weights" / f"run-{run_id}.pt"

    def check_writable(self) -> None:
        """Raise a StoreError now if a run could not be written: call it before long work starts.

        A write is tried inside a transaction that is rolled back (root ignores file modes, and a
        read-only file may still open: only a real write tells), and the weights folder is checked.
        """
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE 0")
            db.rollback()
        probe = self.root / "weights" / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"Cannot write run weights in {probe.parent} ({exc.strerror or exc}): fix its "
                             "permissions or set PRUNING_EXPLORER_DATA to a writable folder.") from None

    def new_sweep(self, name: str) -> str:
        """A sweep id no other sweep in this store has: ``name (start time) #n``, n handed out by the store."""
        created = time.time()
        with self._connect() as db:
            if self._unmigrated is not None:
                raise self._unmigrated
            number = db.execute("INSERT INTO sweeps (name, created) VALUES (?, ?)", (name, created)).lastrowid
        return f"{name} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(created))}) #{number}"

    def save(self, run: Run, model: nn.Module | None = None, *, input_shape=None, num_classes=None,
             keep: bool = True) -> Run:
        """Store a run (and its pruned weights, when given); returns it with id and time set.

        When the database refuses it, nothing computed is lost: with ``keep`` the run (and weights)
        go to a file (`keep_runs`) and the StoreError names it (``.kept``); without, the StoreError
        leaves keeping to the caller (a sweep gathers all its refused points in one file).
        """
        run.created = run.created or time.time()
        weights = {"arch": run.settings.get("arch", run.model_name),
                   "input_shape": input_shape or run.settings.get("input_shape"),
                   "num_classes": num_classes or run.settings.get("num_classes")}
        try:
            with self._connect() as db:
                cursor = db.execute(
                    f"INSERT INTO runs ({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})",
                    (run.name or "", run.created, run.model_name, run.dataset, run.structure, run.criterion,
                     run.scope, float(run.sparsity), json.dumps(run.settings), json.dumps(run.metrics),
                     json.dumps(run.history), json.dumps(run.recipe), int(run.stage), json.dumps(run.trajectory),
                     run.sweep or ""))
                run.id = int(cursor.lastrowid)
                named = run.name or _default_name(run)
                db.execute("UPDATE runs SET name = ? WHERE id = ?", (named, run.id))
            run.name = named
        except StoreError as exc:
            run.id = None
            if not keep:
                raise
            stem = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            try:
                kept = keep_runs([run], self.root, stem, model, **weights)
            except StoreError as lost:
                raise StoreError(f"{exc} {lost}") from None
            raise StoreError(f"{exc} Nothing is lost: the run is kept in {kept}"
                             + (" (weights beside it)" if kept.with_suffix(".pt").exists() else "")
                             + "; once the store is fixed, Compare's button or `python -m explorer restore` puts "
                               "it back.", kept=kept) from None
        if model is not None:
            try:
                save_model(model, self.weights_path(run.id), **weights, metadata={"run": run.id})
            except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError
                reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0]
                failed = f"Run {run.id} is stored but its weights could not be written to " \
                         f"{self.weights_path(run.id)} ({reason})"
                try:
                    kept = keep_runs([run], self.root, f"run-{run.id}", model, **weights)
                except StoreError as lost:
                    raise StoreError(f"{failed}. {lost}") from None
                where = (f"they are kept in {kept.with_suffix('.pt')}" if kept.with_suffix(".pt").exists()
                         else "no other folder took them either")
                raise StoreError(f"{failed}; {where}: fix the folder's permissions or free disk space.",
                                 kept=kept) from None
        return run

    def kept_files(self) -> list[Path]:
        """The files of runs this store refused (`keep_runs` wrote them to its ``unsaved/`` folder), oldest first."""
        folder = self.root / "unsaved"
        files = [path for path in folder.glob("*.json") if not path.name.startswith(".")] if folder.is_dir() else []
        return sorted(files, key=lambda path: (path.stat().st_mtime, path.name))

    def restore(self, path: str | Path) -> list[Run]:
        """Put the runs of a kept file back into the store, with the weights kept beside it; returns them.

        A run stored before only its weights were refused (it has an id the store holds) gets its weights
        back and no second row. Once every run is in, the file (and its ``.pt``) move to ``unsaved/restored/``;
        if the store refuses one, the runs already restored leave the file, the rest stay in it, and the
        StoreError says so: restoring again never stores a run twice.
        """
        path = Path(path)
        runs = _read_kept(path)
        weights = path.with_suffix(".pt")
        weights = weights if len(runs) == 1 and weights.is_file() else None
        done: list[Run] = []
        for index, run in enumerate(runs):
            try:
                if run.id is not None and self._holds(run):
                    stored = run
                else:
                    run.id = None
                    stored = self.save(run, keep=False)
                if weights is not None:
                    self.weights_path(stored.id).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(weights, self.weights_path(stored.id))
            except (StoreError, OSError) as exc:
                message = str(exc) if isinstance(exc, StoreError) else \
                    f"Could not copy the weights {weights} into the store ({exc.strerror or exc})"
                left = runs[index:]
                if done or run.id is not None:  # a run stored before its weights failed keeps its id: never stored twice
                    _write_whole(path, json.dumps([run.to_dict() for run in left], indent=1))
                raise StoreError(f"{message} Restored {len(done)} of {len(runs)} runs from {path}; the other "
                                 f"{len(left)} stay in it: fix the store and restore again.", kept=path) from None
            done.append(stored)
        target = path.parent / "restored"
        try:
            target.mkdir(exist_ok=True)
            for source in (path, path.with_suffix(".pt")):
                if source.exists():
                    os.replace(source, target / source.name)
        except OSError as exc:
            raise StoreError(f"All {len(done)} runs of {path} are in the store (ids "
                             f"{', '.join(str(run.id) for run in done)}), but the file could not be moved to "
                             f"{target} ({exc.strerror or exc}): delete it by hand, or restoring it again stores "
                             "them twice.") from None
        return done

    def _holds(self, run: Run) -> bool:
        """Whether the store already has this very run (its id and time of creation)."""
        try:
            return self.get(run.id).created == run.created
        except StoreError:
            raise
        except ExplorerError:
            return False

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
        try:
            self.weights_path(run_id).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"Run {run_id} is deleted but its weights file {self.weights_path(run_id)} could not "
                             f"be removed ({exc.strerror or exc}); delete it by hand.") from None

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
