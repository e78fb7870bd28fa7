"""Background jobs: run a long function in a thread, watch its progress, cancel it, keep what it finished.

A Streamlit page reruns its script on every interaction, so a long computation (a fine-tune, a
scan, a sweep) must not block it: `start` runs the function in a daemon thread and returns a
`Job` that the page polls. The function receives a `JobContext`: it reports a fraction and a
status line, appends small live data (the points of a curve), and checks ``context.cancel``, a
``threading.Event`` it can hand straight to `explorer.train.train`. A cancelled function returns
its partial result and the job keeps it. Errors never escape the thread: an `ExplorerError`
becomes its message, anything else one line "<name> failed unexpectedly: Type: message".

Example::

    job = start(lambda context: train(model, data, config, cancel=context.cancel), name="Fine-tuning")
    job.wait(timeout=60)        # a page polls job.done, job.fraction and job.status instead
    print(job.error or job.result.epochs_done)
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from explorer.errors import ExplorerError

log = logging.getLogger(__name__)

_RUNNING: "set[Job]" = set()
_RUNNING_LOCK = threading.Lock()


def running_elsewhere() -> list[str]:
    """Names of the jobs running in this process, other than the one calling (if it is a job).

    A latency measured while a fine-tune trains in the same process measures the contention, not
    the model: `explorer.measure` asks this and flags such a figure.
    """
    with _RUNNING_LOCK:
        return sorted(job.name for job in _RUNNING if job._thread is not threading.current_thread())


class JobContext:
    """What the job's function receives: the cancel flag to check and a way to report progress."""

    def __init__(self, job: "Job") -> None:
        self._job = job
        self.cancel: threading.Event = job.cancel

    @property
    def cancelled(self) -> bool:
        """Whether someone asked the job to stop; the function should return what it has."""
        return self.cancel.is_set()

    def report(self, fraction: float | None = None, status: str | None = None) -> None:
        """Set the fraction done (clamped to [0, 1]) and/or the one-line status."""
        self._job._update(fraction, status)

    def append(self, key: str, item: Any) -> None:
        """Append ``item`` to the payload list ``key`` (one point of a live curve, say)."""
        self._job._append(key, item)


class Job:
    """A function running in a daemon thread; any thread may read its state at any time.

    ``cancel`` is the `threading.Event` the function checks: ``job.cancel.set()`` asks it to stop.
    Until ``done``, ``result`` and ``error`` are None; afterwards exactly one is set (a function
    may also return None). ``meta`` holds whatever the caller wants to keep with the job (the
    settings it ran with, what was saved from it); the job itself never reads it.
    """

    def __init__(self, work: Callable[[JobContext], Any], *, name: str = "The job", meta: dict | None = None):
        self.name = name
        self.meta: dict = dict(meta or {})
        self.cancel = threading.Event()
        self._work = work
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._fraction, self._status, self._payload = 0.0, "waiting to start", {}
        self._result: Any = None
        self._error: str | None = None

    def start(self) -> "Job":
        """Run the function in a new daemon thread (once)."""
        if self._thread is not None:
            raise ExplorerError(f"{self.name} has already been started; start a new job to run it again.")
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"job: {self.name}")
        self._update(None, "running")
        self._thread.start()
        return self

    def _run(self) -> None:
        result, error = None, None
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        try:
            result = self._work(JobContext(self))
        except ExplorerError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown to the user as one line; the traceback goes to the log
            log.error("%s failed", self.name, exc_info=exc)
            message = (str(exc).splitlines() or [""])[0]
            error = f"{self.name} failed unexpectedly: {type(exc).__name__}" + (f": {message}" if message else "")
        with self._lock:
            self._result, self._error = result, error
            self._status = "failed" if error else "cancelled" if self.cancel.is_set() else "finished"
            if error is None and not self.cancel.is_set():
                self._fraction = 1.0
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        self._finished.set()

    def _update(self, fraction: float | None, status: str | None) -> None:
        with self._lock:
            if fraction is not None:
                self._fraction = min(1.0, max(0.0, float(fraction)))
            if status is not None:
                self._status = status

    def _append(self, key: str, item: Any) -> None:
        with self._lock:
            self._payload.setdefault(key, []).append(item)

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def result(self) -> Any:
        """What the function returned (partial when it was cancelled); None until done."""
        return self._result if self.done else None

    @property
    def error(self) -> str | None:
        """A message for the user when the function raised; None otherwise."""
        return self._error if self.done else None

    @property
    def cancelled(self) -> bool:
        """Whether a cancel was asked for (the result, if any, may then be partial)."""
        return self.cancel.is_set()

    @property
    def fraction(self) -> float:
        with self._lock:
            return self._fraction

    @property
    def status(self) -> str:
        with self._lock:
            return self._status

    def payload(self) -> dict[str, list]:
        """A copy of the lists the function appended to, safe to read while it still runs."""
        with self._lock:
            return {key: list(items) for key, items in self._payload.items()}

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done or ``timeout`` seconds pass; True if it is done."""
        return self._finished.wait(timeout)


def start(work: Callable[[JobContext], Any], *, name: str = "The job", meta: dict | None = None) -> Job:
    """Run ``work(context)`` in the background and return its `Job` at once.

    ``name`` starts the message of an unexpected failure ("Fine-tuning failed unexpectedly: ...").
    """
    return Job(work, name=name, meta=meta).start()
