"""Dense vs pruned on each runtime the user may ship: eager PyTorch, ``torch.compile``, ONNX Runtime.

A runtime is only a different way to call the same two models, so every runtime is timed by the
same machinery as the rest of the app (`explorer.timing`): dense and pruned alternately, sample by
sample, the speed-up the median of the per-pair ratios with its distribution-free 95 % interval,
stopping at +-5 % or ``max_run_time``, on no more threads than the machine has free cores, and
flagged noisy when the interval stays wide. Each runtime gets the same input, batch and threads.

"measured / FLOPs" divides the measured speed-up by the FLOPs speed-up (dense effective FLOPs over
pruned effective FLOPs, `measure.flops`): 1.0 means the runtime delivers every FLOP removed, 0.1 a
tenth of the promise (the usual fate of zeros inside dense tensors). ``torch.compile``'s compile
time (its first call) and ONNX's export time are reported apart from the timing; the first compile
in a process also pays inductor's start-up, and a second model of the same shapes may reuse its code.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from explorer import jobs, measure, timing
from explorer.backends import torch_threads
from explorer.deploy import export
from explorer.errors import ExplorerError
from explorer.layers import clone_model

RUNTIMES = ("eager", "compile", "onnxruntime", "onnxruntime-cuda")
DEFAULT_RUNTIMES = ("eager", "compile", "onnxruntime")
WARMUP = 3
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests swap in a backend that needs no C++ compiler


def available_runtimes() -> list[str]:
    """The runtimes this machine can time: ONNX Runtime's CUDA provider only where a GPU and its build are."""
    names = ["eager", "compile"]
    try:
        import onnxruntime as ort
    except ImportError:
        return names
    names.append("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("onnxruntime-cuda")
    return names


def parse_runtimes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"eager,compile"`` (or a list) checked against `RUNTIMES`; one line naming the bad one."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    if not names:
        raise ExplorerError(f"Name at least one runtime: {', '.join(RUNTIMES)}.")
    for name in names:
        if name not in RUNTIMES:
            raise ExplorerError(f"Unknown runtime '{name}': use {', '.join(RUNTIMES)} (comma-separated).")
    return tuple(dict.fromkeys(names))


def batch_of(example_input: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` rows of ``example_input`` (repeated when it has fewer): real inputs, never made-up values."""
    repeats = -(-batch // len(example_input))
    return example_input.repeat(repeats, *([1] * (example_input.dim() - 1)))[:batch].clone()


def compare_runtimes(dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor, *,
                     runtimes: tuple[str, ...] = DEFAULT_RUNTIMES, batches: tuple[int, ...] = (1, 64),
                     threads: int | None = None, min_run_time: float = 0.5, max_run_time: float | None = None,
                     progress: Callable[[float, str], None] | None = None, cancel=None) -> dict:
    """Time ``dense`` against ``pruned`` on each runtime and batch size: one row per (runtime, batch).

    A row holds both latencies with their intervals (``dense_ms``, ``pruned_ms``, ``*_interval_ms``),
    ``speedup`` and ``speedup_interval`` (median per-pair ratio, 95 %), ``noisy`` and ``noise``,
    ``speedup_flops``, ``measured_over_flops``, ``setup_s`` (compile or export time of both models),
    or ``error`` (one line) for a runtime that could not run this model. The result also states
    ``threads`` (and why, ``threads_note``), ``device``, machine ``load`` and the FLOPs per input.
    Masked models run as deployed (masks folded). ``cancel`` (a ``threading.Event``) is checked
    before each row: once set, the rows done so far come back with ``cancelled`` True.
    """
    runtimes = parse_runtimes(runtimes)
    load = timing.machine_load()
    threads, threads_note = timing.choose_threads(threads, torch.get_num_threads(), load)
    models = {"dense": export.deployable(dense), "pruned": export.deployable(pruned)}
    one = example_input[:1]
    flops = {label: measure.flops(model, one)["effective"] for label, model in models.items()}
    speedup_flops = flops["dense"] / max(1, flops["pruned"])
    rows = []
    steps = len(runtimes) * len(batches)
    with tempfile.TemporaryDirectory(prefix="deploy-") as folder:
        for index, (runtime, batch) in enumerate((r, b) for r in runtimes for b in batches):
            if cancel is not None and cancel.is_set():
                break
            if progress is not None:
                progress(index / steps, f"{runtime}, batch {batch}")
            inputs = batch_of(example_input, batch)
            row = {"runtime": runtime, "batch": batch, "threads": threads,
                   "device": "cuda" if runtime == "onnxruntime-cuda" else "cpu", "speedup_flops": speedup_flops}
            try:
                calls, setup_s, layout = _prepare(runtime, models, inputs, threads, Path(folder))
                summary = _time(calls, threads, load, min_run_time, max_run_time)
            except ExplorerError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' rows
                rows.append({**row, "error": f"{runtime} could not run this model: {type(exc).__name__}: "
                                             f"{export._first_line(exc)}"})
                continue
            speedup = summary["speedup_measured"]
            rows.append({**row, "layout": layout, "setup_s": setup_s,
                         "dense_ms": summary["dense"]["median_ms"], "pruned_ms": summary["pruned"]["median_ms"],
                         "dense_interval_ms": summary["dense"]["interval_ms"],
                         "pruned_interval_ms": summary["pruned"]["interval_ms"],
                         "speedup": speedup, "speedup_interval": summary["speedup_interval"],
                         "measured_over_flops": speedup / speedup_flops,
                         "noisy": summary["noisy"], "noise": summary["noise"], "pairs": summary["pairs"],
                         "seconds": summary["seconds"]})
    if progress is not None:
        progress(1.0, "done")
    return {"rows": rows, "cancelled": bool(cancel is not None and cancel.is_set()), "threads": threads,
            "threads_note": threads_note or None, "load": load.to_dict(),
            "flops": {"dense": flops["dense"], "pruned": flops["pruned"], "per": "input"},
            "speedup_flops": speedup_flops}


def _prepare(runtime: str, models: dict[str, nn.Module], inputs: torch.Tensor, threads: int,
             folder: Path) -> tuple[dict[str, Callable[[], object]], dict[str, float] | None, str]:
    """The two calls to time on ``runtime``, the seconds each took to compile or export, and the layout."""
    if runtime in ("eager", "compile"):
        channels_last = inputs.dim() == 4  # as `measure.compare_latency`: oneDNN's convolutions prefer it
        x = inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs
        prepared = {label: clone_model(m).to(memory_format=torch.channels_last) if channels_last else m
                    for label, m in models.items()}
        layout = "channels_last" if channels_last else "contiguous"
        if runtime == "eager":
            return {label: (lambda m=m: m(x)) for label, m in prepared.items()}, None, layout
        setup = {}
        calls = {}
        for label, model in prepared.items():
            compiled = torch.compile(model, dynamic=False, backend=COMPILE_BACKEND)
            start = time.perf_counter()
            with torch.inference_mode(), torch_threads(threads):
                compiled(x)  # the first call compiles
            setup[label] = round(time.perf_counter() - start, 3)
            calls[label] = lambda c=compiled: c(x)
        return calls, setup, layout
    provider = "CUDAExecutionProvider" if runtime == "onnxruntime-cuda" else "CPUExecutionProvider"
    if runtime not in available_runtimes():
        raise ExplorerError(f"{runtime} is not available here (ONNX Runtime's {provider} is missing).")
    setup, calls = {}, {}
    array = inputs.cpu().numpy()
    for label, model in models.items():
        path = folder / f"{label}.onnx"
        start = time.perf_counter()
        if not path.exists():
            result = export.export(model, inputs[:2], "onnx", path)
            if result.error:
                raise ExplorerError(result.error)
        session = export.onnx_session(path, threads=threads, provider=provider)
        setup[label] = round(time.perf_counter() - start, 3)
        name = session.get_inputs()[0].name
        calls[label] = lambda s=session, n=name: s.run(None, {n: array})
    return calls, setup, "NCHW (ONNX Runtime's own)" if inputs.dim() == 4 else "contiguous"


def _time(calls: dict[str, Callable[[], object]], threads: int, load: timing.Load, min_run_time: float,
          max_run_time: float | None) -> dict:
    """`timing.time_alternating` and `timing.summarise` over the two calls, on ``threads`` threads."""
    with torch.inference_mode(), torch_threads(threads):
        for call in calls.values():
            for _ in range(WARMUP):
                call()
        samples, _ = timing.time_alternating(
            calls, min_run_time=min_run_time,
            max_run_time=max(timing.MAX_RUN_TIME_S, min_run_time) if max_run_time is None else max_run_time)
    return timing.summarise(samples, load=load, busy_jobs=jobs.running_elsewhere())
