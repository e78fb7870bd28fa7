"""Where many independent pieces of work run: this process, a local process pool, or a Ray cluster.

A sweep (`explorer.sweep`) runs one recipe per grid point and a sensitivity scan can split its units
across workers; both hand `run_tasks` a function and a list of argument tuples and get each result
back as it finishes. The backend is only *where* the calls run, never *what* they compute:

* ``local`` — a pool of fresh Python processes on this machine (``spawn``: a forked copy of a process
  that already ran torch's thread pool can hang), one call per worker at a time; with one worker the
  calls run in this process, one after the other.
* ``ray`` — a Ray cluster at ``address`` (``host:port`` or ``ray://host:port``), or a local Ray
  instance when none is given, so a grid that outgrows one machine fans out over a cluster unchanged.
  Ray is optional: it is imported only here, only for this backend. The workers receive the
  ``explorer`` package itself (Ray's ``py_modules``), so a cluster needs Ray and the requirements,
  not a checkout.

Every call runs with the same number of torch threads (``threads``, default 1) on every backend:
a float sum split over another number of threads is added in another order, and the same seed
must give the same numbers wherever it runs. At most ``workers`` calls are in flight; a ``cancel``
(anything with ``is_set()``) stops new calls from starting and lets the running ones finish, so
what finished is kept. An interrupt (Ctrl-C, or SIGTERM turned into one) or an early stop of the
iteration ends the local pool's workers at once instead: none is left running on its own.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from explorer.errors import ExplorerError

BACKENDS = ("local", "ray")
RAY_REQUIREMENT = "ray==2.60.0"  # the pin of requirements-dev.txt
CONNECT_TIMEOUT_S = 5.0
# Environment a local Ray instance's workers need to share this process's caches (baselines, runs).
_SHARED_ENV = ("PRUNING_EXPLORER_CACHE", "PRUNING_EXPLORER_DATA", "HF_HUB_OFFLINE")


def call(fn: Callable, args: tuple, threads: int) -> Any:
    """``fn(*args)`` with torch limited to ``threads`` threads (what every backend runs in a worker)."""
    with torch_threads(threads):
        return fn(*args)


@contextmanager
def torch_threads(threads: int):
    """Run a block with ``threads`` intra-op threads, then restore the number it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def check_backend(backend: str, address: str | None = None, workers: int | None = None) -> None:
    """Refuse a bad backend, a worker count below 1, an address for the local pool, a missing Ray."""
    if backend not in BACKENDS:
        raise ExplorerError(f"Unknown backend '{backend}': choose {' or '.join(BACKENDS)}.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ExplorerError(f"workers must be a whole number of at least 1, got {workers!r}.")
    if backend == "local" and address:
        raise ExplorerError("--address names a Ray cluster: use it with --backend ray.")
    if backend == "ray":
        _import_ray()
        if address:
            check_reachable(address)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExplorerError(f"--backend ray needs Ray, which is not installed: pip install {RAY_REQUIREMENT}") from None
    return ray


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within about 2 x ``timeout_s`` when nothing, or something that is not Ray, answers at a Ray address.

    Ray itself waits much longer (past a minute) on both. A Ray cluster's address (the GCS, or a
    ``ray://`` client server) speaks gRPC, which is HTTP/2: a server answers a client's connection
    preface with a SETTINGS frame. A port that takes the connection but answers nothing, or
    anything else, is not a Ray cluster.
    """
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExplorerError(f"Ray address '{address}' is not host:port (or ray://host:port).")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as exc:
        raise ExplorerError(f"Cannot reach a Ray cluster at {address} within {timeout_s:g} s ({exc}); start one "
                            "with `ray start --head` or leave --address out for a local Ray instance.") from None
    with connection:
        speaks_grpc = _answers_http2(connection, timeout_s)
    if not speaks_grpc:
        raise ExplorerError(f"{address} takes connections but does not answer as a Ray cluster (no gRPC greeting "
                            f"within {timeout_s:g} s): check the host and port (`ray status` on the head node "
                            "prints them) or leave --address out for a local Ray instance.")


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS


def _answers_http2(connection: socket.socket, timeout_s: float) -> bool:
    """Whether the peer answers HTTP/2's connection preface with a SETTINGS frame (type 4, stream 0) in time."""
    deadline = time.monotonic() + timeout_s
    header = b""
    try:
        connection.sendall(_HTTP2_PREFACE)
        while len(header) < 9:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            connection.settimeout(left)
            chunk = connection.recv(9 - len(header))
            if not chunk:  # closed without a word
                return False
            header += chunk
    except OSError:  # a timeout, a reset
        return False
    return header[3] == 4 and int.from_bytes(header[5:9], "big") & 0x7FFFFFFF == 0


def run_tasks(fn: Callable, argsets: Sequence[tuple], *, backend: str = "local", address: str | None = None,
              workers: int | None = None, threads: int = 1, cancel=None) -> Iterator[tuple[int, Any, str | None]]:
    """Call ``fn(*argsets[i])`` for every i on ``backend``; yield ``(i, result, error)`` as each finishes.

    ``error`` is None, or one line when the call raised (the other calls go on). ``fn`` must be a
    module-level function of ``explorer`` (workers import it by name). Stops starting calls once
    ``cancel.is_set()``; the calls already running finish and are yielded.
    """
    check_backend(backend, address, workers)
    if backend == "ray":
        yield from _run_ray(fn, argsets, address, workers, threads, cancel)
        return
    workers = min(workers or default_workers(), max(1, len(argsets)))
    if workers == 1:
        for index, args in enumerate(argsets):
            if cancel is not None and cancel.is_set():
                return
            try:
                yield index, call(fn, args, threads), None
            except Exception as exc:  # noqa: BLE001 - one failed call is reported, the rest go on
                yield index, None, _one_line(exc)
    else:
        context = multiprocessing.get_context("spawn")
        with _bare_main():
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_setup,
                                       initargs=(os.getpid(),))
            try:
                yield from _drive(argsets, workers, cancel, lambda args: pool.submit(call, fn, args, threads),
                                  _wait_futures, lambda future: future.result())
            except BaseException:  # an interrupt, an error, or the caller stopped iterating (GeneratorExit)
                _end_workers(pool)
                raise
            pool.shutdown(wait=True)


def _worker_setup(parent_pid: int) -> None:
    """In each pool worker: leave Ctrl-C to the parent, and (Linux) die with the parent even if it is killed.

    A terminal's Ctrl-C reaches every process of the group; the parent alone decides, and ends the
    workers (`_end_workers`). ``PR_SET_PDEATHSIG`` covers a parent killed outright (SIGKILL), which
    runs no clean-up at all.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers now (Python 3.14 has ``pool.terminate_workers``)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


@contextmanager
def _bare_main():
    """While the pool runs, ``__main__`` is an empty module, so the spawned workers import no main script.

    ``spawn`` re-runs the parent's main *file* in every worker (a module run with ``-m`` is skipped).
    That file may be a Streamlit page (Streamlit installs each page as ``__main__``), a script fed on
    stdin, or a notebook: none of it is needed, since every call is `call` with a function of
    ``explorer``, and re-running a page in a worker would redo its work or fail.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _wait_futures(running):
    done, _ = wait(running, return_when=FIRST_COMPLETED)
    return done


def _drive(argsets, workers, cancel, submit, wait_some, result, abandon=None):
    """Keep at most ``workers`` calls in flight; yield each as it finishes; start no new one after a cancel.

    On an interrupt or an early stop, ``abandon(handles)`` is given the calls still in flight.
    """
    queue = list(enumerate(argsets))[::-1]
    running: dict = {}
    try:
        while queue or running:
            while queue and len(running) < workers and not (cancel is not None and cancel.is_set()):
                index, args = queue.pop()
                running[submit(args)] = index
            if not running:
                return
            for handle in wait_some(list(running)):
                index = running.pop(handle)
                try:
                    outcome = index, result(handle), None
                except Exception as exc:  # noqa: BLE001 - a worker that died or raised: report, go on
                    outcome = index, None, _one_line(exc)
                yield outcome
    except BaseException:
        if abandon is not None and running:
            abandon(list(running))
        raise


def ray_runtime_env(local: bool = True) -> dict:
    """What `ray.init` needs for workers to run explorer's functions: the package itself, shipped by Ray.

    A local instance also shares this process's caches (baselines, run store); a cluster's nodes keep
    their own. Pass it to your own ``ray.init`` when you start Ray before a sweep.
    """
    runtime_env: dict = {"py_modules": [str(Path(__file__).parent)]}
    if local:
        runtime_env["env_vars"] = {name: os.environ[name] for name in _SHARED_ENV if name in os.environ}
    return runtime_env


def _run_ray(fn, argsets, address, workers, threads, cancel):
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, num_cpus=None if address else workers or default_workers(),
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=ray_runtime_env(local=not address))
        except Exception as exc:  # noqa: BLE001 - Ray raises many types for a cluster it cannot join
            raise ExplorerError(f"Cannot start or join Ray at {address or 'a local instance'}: "
                                f"{_one_line(exc)}") from None
    if workers is None:  # as many calls as the cluster has CPUs for
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    workers = min(workers, max(1, len(argsets)))
    remote = ray.remote(call).options(num_cpus=threads)
    def abandon(refs):  # a cluster outlives this process: stop its tasks, not only the local instance
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - a task that finished meanwhile, a lost connection
                pass

    try:
        yield from _drive(argsets, workers, cancel, lambda args: remote.remote(fn, args, threads),
                          lambda running: ray.wait(running, num_returns=1)[0], ray.get, abandon)
    finally:
        if started:
            ray.shutdown()


def _one_line(exc: BaseException) -> str:
    cause = exc
    while getattr(cause, "cause", None) is not None:  # a Ray task error wraps the worker's exception
        cause = cause.cause
    if isinstance(cause, ExplorerError):
        return (str(cause).splitlines() or [""])[0]
    message = (str(cause).splitlines() or [""])[0]
    return f"{type(cause).__name__}" + (f": {message}" if message else "")
