"""A time limit on torch-pruning's dependency trace, checked inside torch-pruning's own loops, in any thread.

torch-pruning traces some models for longer than anyone waits (torchvision's swin_t and maxvit_t:
over 10 minutes on a 2-core machine, in its own ``MetaPruner`` too: its graph walk maps channel
indices through every reshape, pure Python), and nothing in it takes a time limit. `limit` sets a
deadline for the current thread; `guard_torch_pruning` wraps the functions that torch-pruning's slow
loops call over and over (the walk's per-edge steps, the index mappings, the recursive shape
inference, the graph trace) with `check`, which raises `TimeLimit` once the deadline has passed, and
replaces the flatten index mapping (single calls of tens of seconds on swin_t) by a copy that checks
inside its loop (same result, tested against the original).

Why this way, and what it costs:

* the exception is raised synchronously, by torch-pruning's own call, in the tracing thread: it works
  in Streamlit's script threads and background jobs (``signal.alarm`` works only in the main thread),
  under a debugger or coverage's tracer, and the result is the trace's own when it ends in time (no
  child process: no fork of a multi-threaded app, nothing pickled back, CUDA models included). An
  earlier version raised the exception from a watchdog thread (``PyThreadState_SetAsyncExc``); under a
  line tracer (coverage, debuggers) the thread it stopped then hung, so it was replaced;
* the limit is as fine as the checks: a stretch of torch-pruning code that reaches none of them (the
  forward pass of the example input, one pass over a huge index list) runs to its end first; on swin_t
  a 30 s limit stopped the trace at 30.4 s;
* the wrappers are installed on torch-pruning's classes and modules for the whole process; outside a
  `limit` a check is one thread-local lookup. They follow torch-pruning 1.6.1 (pinned); a name a later
  release drops is skipped, and `guarded` says what was wrapped;
* ``TimeLimit`` is a ``BaseException`` (like ``KeyboardInterrupt``): ``except Exception`` in torch-pruning
  does not swallow it. The traced model is a copy, abandoned with the trace.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from contextlib import contextmanager

from explorer.errors import ExplorerError

ENV = "PRUNING_EXPLORER_TRACE_LIMIT"
DEFAULT_TRACE_LIMIT_S = 180.0

_local = threading.local()
guarded: list[str] = []  # what guard_torch_pruning wrapped, "module.Class.method"
originals: dict = {}  # what guard_torch_pruning replaced outright (not wrapped), by name


class TimeLimit(BaseException):
    """Raised by `check` past the thread's deadline (a BaseException: ``except Exception`` lets it through)."""


def trace_limit() -> float | None:
    """Seconds torch-pruning's trace may take: ``PRUNING_EXPLORER_TRACE_LIMIT`` (0: no limit), else 180."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_TRACE_LIMIT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ExplorerError(f"{ENV} must be a number of seconds (0 for no limit), got {value!r}.") from None
    if seconds != seconds or seconds < 0:
        raise ExplorerError(f"{ENV} must be a number of seconds (0 for no limit), got {value!r}.")
    return seconds or None


@contextmanager
def limit(seconds: float | None):
    """Within the block, `check` in this thread raises `TimeLimit` after ``seconds`` (None: never)."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = None if seconds is None else time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def check() -> None:
    """Raise `TimeLimit` if this thread is inside a `limit` whose deadline has passed."""
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TimeLimit


def checked(function):
    """``function`` that first runs `check`."""
    if getattr(function, "_deadline_checked", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        check()
        return function(*args, **kwargs)

    wrapper._deadline_checked = True
    return wrapper


# torch-pruning 1.6.1: (module, attribute path) of what its slow loops call per step
_TORCH_PRUNING_HOT = (
    ("torch_pruning.dependency.graph", "DependencyGraph.get_pruning_group"),
    ("torch_pruning.dependency.graph", "DependencyGraph._trace_computational_graph"),
    ("torch_pruning.dependency.graph", "DependencyGraph._build_dependency"),
    ("torch_pruning.dependency.dependency", "Dependency.is_triggered_by"),
    ("torch_pruning.dependency.group", "Group.has_pruning_op"),
    ("torch_pruning.dependency.group", "Group.add_dep"),
    ("torch_pruning.dependency.index_mapping", "update_index_mapping"),
    ("torch_pruning.dependency.index_mapping", "_ConcatIndexMapping.__call__"),
    ("torch_pruning.dependency.index_mapping", "_SplitIndexMapping.__call__"),
    ("torch_pruning.dependency.index_mapping", "_SliceIndexMapping.__call__"),
    ("torch_pruning.dependency.index_mapping", "_GQAIndexMapping.__call__"),
    ("torch_pruning.dependency.shape_infer", "infer_out_channels_recursively"),
    ("torch_pruning.dependency.shape_infer", "infer_in_channels_recursively"),
)


def _flatten_mapping_call(self, idxs):
    """torch-pruning 1.6.1's ``_FlattenIndexMapping.__call__``, same result, with `check` inside its loop.

    One call maps every index through a flatten (x stride) or back (// stride); on swin_t the lists it
    builds grow to millions of indices and a single call ran for more than 36 s, so a check at its entry
    is not enough.
    """
    from torch_pruning import _helpers

    new_idxs = []
    if self.reverse:
        for count, i in enumerate(idxs):
            if count % 4096 == 0:
                check()
            new_idxs.append(_helpers._HybridIndex(idx=(i.idx // self._stride), root_idx=i.root_idx))
        return list(set(new_idxs))
    for count, i in enumerate(idxs):
        if count * self._stride % 4096 < self._stride:
            check()
        new_idxs.extend([_helpers._HybridIndex(idx=k, root_idx=i.root_idx)
                         for k in range(i.idx * self._stride, (i.idx + 1) * self._stride)])
    return new_idxs


_flatten_mapping_call._deadline_checked = True


def guard_torch_pruning() -> list[str]:
    """Wrap torch-pruning's per-step functions with `check` (once per process); returns what is wrapped."""
    import importlib

    try:
        from torch_pruning.dependency import index_mapping
    except ImportError:
        index_mapping = None
    flatten = getattr(index_mapping, "_FlattenIndexMapping", None)
    if flatten is not None and not getattr(flatten.__call__, "_deadline_checked", False):
        originals["_FlattenIndexMapping.__call__"] = flatten.__call__
        flatten.__call__ = _flatten_mapping_call
        guarded.append("torch_pruning.dependency.index_mapping._FlattenIndexMapping.__call__ (checked inside)")

    for module_name, path in _TORCH_PRUNING_HOT:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        function = getattr(owner, name, None) if owner is not None else None
        if function is None or getattr(function, "_deadline_checked", False):
            continue
        setattr(owner, name, checked(function))
        guarded.append(f"{module_name}.{path}")
    return guarded
