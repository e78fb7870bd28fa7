"""Prune, then quantize: dynamic int8 of a pruned model, next to the fp32 pruned and the dense model.

Dynamic quantization stores each weight in 8 bits (a quarter of fp32) and quantizes activations on
the fly, so it needs no calibration data. It is done on the exported ONNX file by ONNX Runtime's
quantizer (`onnxruntime.quantization.quantize_dynamic`), which covers Conv as well as MatMul / Gemm
(torch's dynamic quantization covers only Linear and recurrent layers, leaving a CNN's convolutions
in fp32). Weights are quantized per output channel, which keeps a pruned layer's accuracy better than
one scale per tensor.

`compare` exports dense fp32, pruned fp32 and pruned int8 to ONNX, and gives each file's size, its
latency on ONNX Runtime (timed pairwise against the dense file, `explorer.timing`) and its task metric
(`tasks.evaluate_task` run through the file itself, `OnnxModule`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from explorer import jobs, tasks, timing
from explorer.data import Dataset
from explorer.deploy import export
from explorer.errors import ExplorerError


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind ``model(x)``: the file itself, evaluated like any model."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        super().__init__()
        self.session = export.onnx_session(path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.cpu().numpy()})[0])


def quantize_int8(source: str | Path, target: str | Path) -> Path:
    """Dynamic int8 of the ONNX file ``source`` written to ``target`` (weights per channel, QInt8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with contextlib.redirect_stdout(io.StringIO()), _no_logging():
            quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - the quantizer's refusal is the user's to read, in one line
        raise ExplorerError(f"ONNX Runtime's int8 quantizer refused this model: {export._first_line(exc)}; "
                            "deploy it in fp32.") from None
    return Path(target)


def compare(dense: nn.Module, pruned: nn.Module, dataset: Dataset, *, batch: int = 64, threads: int | None = None,
            max_run_time: float | None = None, folder: str | Path | None = None, evaluate: bool = True,
            progress=None, cancel=None) -> dict:
    """Dense fp32, pruned fp32 and pruned int8 as ONNX files: size, latency and task metric side by side.

    Returns ``{rows: [{model, path, size_bytes, size_vs_dense, latency_ms, speedup, speedup_interval,
    noisy, metric, max_abs_diff}], task, batch, threads}``: ``speedup`` is dense fp32 over that file on
    ONNX Runtime, each timed pairwise against the dense file; ``metric`` is the task's value (test split)
    computed from the file's own outputs; ``max_abs_diff`` compares the file with the pruned PyTorch model.
    ``progress(fraction, text)`` hears each step; ``cancel`` (a threading.Event) is checked between them: the
    rows finished come back with ``cancelled`` True (none when it came before the three files were written).
    """
    def step(fraction: float, text: str) -> bool:
        """Report the step; False once cancelled."""
        if cancel is not None and cancel.is_set():
            return False
        if progress is not None:
            progress(fraction, text)
        return True

    with contextlib.ExitStack() as stack:
        folder = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        example = dataset.example_input(2)
        files = {}
        for index, (label, model) in enumerate((("dense fp32", dense), ("pruned fp32", pruned))):
            if not step(0.1 * index, f"exporting the {label} model to ONNX"):
                return _cancelled([])
            result = export.export(model, example, "onnx", folder / f"{label.replace(' ', '-')}.onnx")
            if result.error:
                raise ExplorerError(result.error)
            files[label] = Path(result.path)
        if not step(0.2, "quantizing the pruned model to int8"):
            return _cancelled([])
        files["pruned int8"] = quantize_int8(files["pruned fp32"], folder / "pruned-int8.onnx")
        load = timing.machine_load()
        threads, threads_note = timing.choose_threads(threads, torch.get_num_threads(), load)
        sessions = {label: OnnxModule(path, threads=threads) for label, path in files.items()}
        inputs = dataset.example_input(batch)
        task = tasks.task_for(dense, dataset)
        reference = export.deployable(pruned)
        rows = []
        for index, (label, path) in enumerate(files.items()):
            if not step(0.3 + 0.7 * index / len(files), f"timing and evaluating the {label} file"):
                break
            row = {"model": label, "path": str(path), "size_bytes": path.stat().st_size}
            row["size_vs_dense"] = row["size_bytes"] / files["dense fp32"].stat().st_size
            with torch.inference_mode():
                row["max_abs_diff"] = float((sessions[label](inputs) - reference(inputs)).abs().max()) \
                    if label != "dense fp32" else None
            row.update(_timed(sessions["dense fp32"], sessions[label], inputs, load, max_run_time)
                       if label != "dense fp32" else {"speedup": 1.0, "speedup_interval": None, "noisy": False})
            if evaluate:
                value = tasks.evaluate_task(sessions[label], dataset, reference=dense, task=task)
                row["metric"] = value["value"]
                row["measure"] = value["measure"]
            rows.append(row)
    dense_ms = next((r["dense_ms"] for r in rows if r.get("dense_ms") is not None), None)
    if rows:
        rows[0]["latency_ms"] = dense_ms
    return {"rows": rows, "task": task, "batch": batch, "threads": threads, "threads_note": threads_note or None,
            "load": load.to_dict(), "cancelled": len(rows) < len(files)}


def _cancelled(rows: list) -> dict:
    """What `compare` returns when cancelled before its files exist: no row, nothing timed."""
    return {"rows": rows, "task": None, "batch": None, "threads": None, "threads_note": None, "load": None,
            "cancelled": True}


def _timed(dense: OnnxModule, other: OnnxModule, inputs: torch.Tensor, load: timing.Load,
           max_run_time: float | None) -> dict:
    array = inputs.cpu().numpy()
    calls = {"dense": lambda: dense.session.run(None, {dense.input_name: array}),
             "other": lambda: other.session.run(None, {other.input_name: array})}
    for call in calls.values():
        call()
    samples, _ = timing.time_alternating(calls, min_run_time=min(0.5, max_run_time or 0.5),
                                         max_run_time=max_run_time or timing.MAX_RUN_TIME_S)
    summary = timing.summarise(samples, load=load, busy_jobs=jobs.running_elsewhere())
    return {"latency_ms": summary["other"]["median_ms"], "dense_ms": summary["dense"]["median_ms"],
            "speedup": summary["speedup_measured"], "speedup_interval": summary["speedup_interval"],
            "noisy": summary["noisy"]}


@contextlib.contextmanager
def _no_logging():
    """The quantizer logs advice ("consider pre-processing") on the root logger: not the user's concern here."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
