"""A base model's figures kept on disk, keyed by the content of its Hugging Face folder.

Every ``prune`` of an ``hf:`` folder measures the dense model again: its perplexity (a full pass
over the test split), parameter count, FLOPs and compressed size. On a 124 M model that is about
half the run, and it never changes while the folder and the evaluation settings do not. `key`
names those figures by the SHA-256 of every file in the folder (weights, config, tokenizer), the
data file's content when there is one, the evaluation settings and `CACHE_VERSION` (raised
whenever a figure's definition changes); `load` and `store` keep them as small JSON files under
``$PRUNING_EXPLORER_CACHE/base/``. A file's digest is remembered by its path, size and
modification time, so a 4 GB folder is read once, not at every run.

Example::

    name = key("hf:/models/gpt2", seq_len=64, seed=0, eval_tokens=None, task="perplexity")
    figures = load(name)        # None the first time
    store(name, {"task": 41.2, "params_total": 124439808, ...})
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_VERSION = 2  # 1: compressed size with deflate's run-length strategy; 2: in independent 16 MiB blocks
_CHUNK = 1 << 22


def cache_dir() -> Path:
    """``$PRUNING_EXPLORER_CACHE/base`` (default ``~/.cache/pruning-explorer/base``)."""
    root = os.environ.get("PRUNING_EXPLORER_CACHE") or Path.home() / ".cache" / "pruning-explorer"
    return Path(root) / "base"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary sibling renamed into place: a reader never sees half a file. Best effort:
    a cache that cannot be written only costs the next run its time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(staging, path)
    except OSError:
        pass


def file_digest(path: Path, memo: dict) -> str:
    """SHA-256 of one file, taken from ``memo`` while its size and modification time are unchanged."""
    stat = path.stat()
    entry = memo.get(str(path.resolve()))
    if isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
        return entry[2]
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    memo[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over the names and contents of every file in ``folder`` (subfolders included, sorted)."""
    folder = Path(folder)
    memo_path = cache_dir() / "files.json"
    memo = _read_json(memo_path)
    before = dict(memo)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + file_digest(path, memo).encode())
    if memo != before:
        _write_json(memo_path, memo)
    return digest.hexdigest()


def key(source: str, *, data_file: str | None = None, **settings) -> str | None:
    """The cache name of a base model's figures, or None when ``source`` is not an ``hf:`` folder.

    ``settings`` are everything else the figures depend on (sequence length, seed, token budget,
    task, the example input's shape); they must be JSON-serialisable.
    """
    if not source.startswith("hf:") or not Path(source[3:]).expanduser().is_dir():
        return None
    parts = {"version": CACHE_VERSION, "folder": folder_digest(Path(source[3:]).expanduser()),
             "data_file": file_digest(Path(data_file), {}) if data_file else None, **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load(name: str | None) -> dict | None:
    """The figures stored under ``name``, or None."""
    if name is None:
        return None
    figures = _read_json(cache_dir() / f"{name}.json")
    return figures or None


def store(name: str | None, figures: dict) -> None:
    """Keep ``figures`` (a JSON-serialisable dict) under ``name``; nothing for a None name."""
    if name is not None:
        _write_json(cache_dir() / f"{name}.json", figures)
