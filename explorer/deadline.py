"""A time limit on a slow pure-Python step (torch-pruning's dependency trace), in any thread.

torch-pruning traces some models for longer than anyone waits (torchvision's swin_t and maxvit_t:
over 10 minutes on a 2-core machine, in its own ``MetaPruner`` too), and nothing in it takes a
time limit. `within` runs a call in the current thread and, if it has not returned after
``seconds``, raises `TimeLimit` inside it: a watchdog thread asks the interpreter to raise the
exception in the caller's thread (``PyThreadState_SetAsyncExc``), as Ctrl-C would in the main
thread. So the result is the call's own result when it finishes in time (no copy, no pickling, no
second process), it works in Streamlit's script threads and background jobs (where ``signal.alarm``
cannot be used), and a call that ends in time is never disturbed.

The trade-offs, chosen over a child process (a hard limit, but a fork of a multi-threaded app that
may hold locks or CUDA, and every result pickled back) and over a structural pre-check (which
would have to predict torch-pruning's cost and guess wrong both ways):

* the exception lands between Python bytecodes: one long C call (a single huge forward) runs to
  its end first; torch-pruning's slow part is Python (its graph walk), so the limit holds there;
* the exception is a ``BaseException`` (like ``KeyboardInterrupt``), so ``except Exception`` in the
  traced code does not swallow it; it is raised again every half second until the call returns;
* the call is abandoned at an arbitrary point: only work on a copy (the trace is) may be bounded.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

from explorer.errors import ExplorerError

T = TypeVar("T")

ENV = "PRUNING_EXPLORER_TRACE_LIMIT"
DEFAULT_TRACE_LIMIT_S = 180.0
_REPEAT_S = 0.5


class TimeLimit(BaseException):
    """Raised inside a call that ran past its limit (a BaseException: ``except Exception`` lets it through)."""


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


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Make ``thread_id`` raise ``exception`` at its next bytecode (None: forget one not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception is not None else ctypes.c_void_p(None))


def within(call: Callable[[], T], seconds: float | None) -> T:
    """``call()``, or `TimeLimit` raised inside it once it has run ``seconds`` (None: no limit)."""
    if seconds is None:
        return call()
    caller = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}
    stop = threading.Event()

    def watch() -> None:
        if stop.wait(seconds):
            return
        while True:
            with lock:
                if state["done"]:
                    return
                state["fired"] = True
                _raise_in(caller, TimeLimit)
            if stop.wait(_REPEAT_S):
                return

    watchdog = threading.Thread(target=watch, name="explorer-deadline", daemon=True)
    watchdog.start()
    try:
        return call()
    finally:
        # First statement, no call before it: from here on the watchdog (which looks under the lock) sends
        # nothing more. One it sent just before may still be pending: forgotten below, or it lands here and
        # leaves as TimeLimit; either way none reaches the caller's later code.
        state["done"] = True
        with lock:
            if state["fired"]:
                _raise_in(caller, None)
        stop.set()
