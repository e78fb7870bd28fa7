"""Export a pruned model and check the file: ONNX, TorchScript, ``.pt2``, each reloaded and compared.

A masked model is exported as deployed: its masks folded into plain weights (``weight * mask``,
the ``torch.nn.utils.prune`` re-parametrisation removed), so the file holds one tensor per weight
with its zeros; a physically smaller model exports as it is. Zeros do not shrink a dense file: the
deflate-compressed size (``zlib`` level 6 of the whole file, as a zip download would store it) is
where unstructured sparsity shows, next to the raw size.

Every export is checked, never trusted: the file is loaded back (ONNX Runtime for ``.onnx``,
``torch.jit.load``, ``torch.export.load``) and run on the same inputs as the PyTorch model; the
largest absolute difference of the outputs is reported. The batch axis is exported as dynamic,
and a second batch size tells whether the file really accepts another batch.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): on this project's models it gives
the same graph as the ``torch.export``-based one (max abs difference below 1e-6 for both on MiniLM)
in a fifth of the time, and writes one self-contained file. When it fails, the ``torch.export``-based
exporter (onnxscript) is tried before giving up; the result names the exporter that wrote the file.
"""
from __future__ import annotations

import contextlib
import io
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from explorer import measure
from explorer.errors import ExplorerError
from explorer.layers import clone_model, is_masked

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts.pt", "pt2": ".pt2"}
OPSET = 18  # ONNX opset written: ONNX Runtime 1.32 and its int8 quantizer run it
TOLERANCE = 1e-4  # max abs difference an export must stay within to count as checked


@dataclass
class Exported:
    """One exported file and its check.

    ``max_abs_diff`` compares the reloaded file's outputs with the PyTorch model's on the same
    ``check_batch`` inputs; ``dynamic_batch`` says whether the file also ran another batch size.
    ``compressed_bytes`` is deflate (zlib level 6) of the file. ``error`` (one line) replaces the
    numbers when the export failed.
    """

    format: str
    path: str | None
    exporter: str | None = None
    size_bytes: int | None = None
    compressed_bytes: int | None = None
    max_abs_diff: float | None = None
    check_batch: int | None = None
    dynamic_batch: bool | None = None
    seconds: float | None = None
    masked: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_abs_diff is not None and self.max_abs_diff <= TOLERANCE

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def deployable(model: nn.Module) -> nn.Module:
    """A copy in eval mode with any masks folded in (``prune.remove``): the model as it ships."""
    return clone_model(model, fold_masks=True).eval()


def export(model: nn.Module, example_input: torch.Tensor, fmt: str, path: str | Path) -> Exported:
    """Export ``model`` to ``path`` in ``fmt`` and check the file against the model.

    ``example_input`` (a real batch) traces the model; the check runs the file on it and on a batch
    one larger (the dynamic batch axis). Any failure comes back as ``error``, one line naming the op
    or layer where torch gives it, and what to try; nothing is raised for a model that will not export.
    """
    if fmt not in FORMATS:
        raise ExplorerError(f"Unknown export format '{fmt}': use {', '.join(FORMATS)}.")
    masked = is_masked(model)
    deployed = deployable(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        exporter = _WRITERS[fmt](deployed, example_input, path)
    except Exception as exc:  # noqa: BLE001 - an export failure is reported, never a crash
        return Exported(format=fmt, path=None, masked=masked,
                        error=explain_failure(fmt, exc, deployed, example_input))
    seconds = time.perf_counter() - start
    size = measure.file_size_bytes(path)
    result = Exported(format=fmt, path=str(path), exporter=exporter, size_bytes=size["raw"],
                      compressed_bytes=size["compressed"], seconds=round(seconds, 3), masked=masked,
                      check_batch=int(example_input.shape[0]))
    try:
        run = load_exported(fmt, path)
        result.max_abs_diff = max_abs_diff(deployed, run, example_input)
    except Exception as exc:  # noqa: BLE001
        result.error = f"The {fmt} file was written but does not run back: {_first_line(exc)}"
        return result
    try:
        max_abs_diff(deployed, run, _grown(example_input))
        result.dynamic_batch = True
    except Exception:  # noqa: BLE001 - a file fixed to one batch size is still a valid export
        result.dynamic_batch = False
    return result


def export_all(model: nn.Module, example_input: torch.Tensor, folder: str | Path, *, stem: str = "model",
               formats: tuple[str, ...] = FORMATS, progress=None, cancel=None) -> list[Exported]:
    """`export` to every format in ``formats``, into ``folder`` as ``stem`` + the format's suffix.

    ``progress(fraction, text)`` hears each format as it starts; ``cancel`` (a threading.Event) is checked
    before each one: once set, the files done so far come back (fewer than ``formats``).
    """
    folder = Path(folder)
    done = []
    for index, fmt in enumerate(formats):
        if cancel is not None and cancel.is_set():
            break
        if progress is not None:
            progress(index / len(formats), f"exporting and checking {fmt}")
        done.append(export(model, example_input, fmt, folder / f"{stem}{SUFFIX[fmt]}"))
    return done


def load_exported(fmt: str, path: str | Path):
    """A callable ``tensor -> tensor`` running the exported file at ``path`` (ONNX Runtime for ONNX)."""
    path = Path(path)
    if fmt == "onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    raise ExplorerError(f"Unknown export format '{fmt}': use {', '.join(FORMATS)}.")


def onnx_session(path: str | Path, *, threads: int | None = None, provider: str = "CPUExecutionProvider"):
    """An ONNX Runtime session for ``path`` on ``provider`` with ``threads`` intra-op threads (None: its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=[provider])


def max_abs_diff(model: nn.Module, run, inputs: torch.Tensor) -> float:
    """Largest |model(inputs) - run(inputs)| over every output element."""
    with torch.inference_mode():
        expected = model(inputs)
        got = run(inputs)
    if tuple(got.shape) != tuple(expected.shape):
        raise ExplorerError(f"the exported file gives outputs of shape {tuple(got.shape)}, PyTorch "
                            f"{tuple(expected.shape)}")
    return float((got.float() - expected.float()).abs().max()) if expected.numel() else 0.0


def explain_failure(fmt: str, exc: BaseException, model: nn.Module | None = None,
                    example_input: torch.Tensor | None = None) -> str:
    """One line: what failed in which format (the op, and the layer that calls it) and what to try.

    torch names the op (``aten::...``) in its message; the layer is found by running ``model`` once
    and noting which module was running when that op was called (`layer_calling`).
    """
    message = " ".join(str(exc).split())
    op = re.search(r"(aten::\w+)", message)
    where = ""
    if op:
        where = f" at op {op.group(1)}"
        if model is not None and example_input is not None:
            layer = layer_calling(model, example_input, op.group(1))
            where += f" in layer '{layer}'" if layer else (" in the model's own forward" if layer == "" else "")
    advice = {"onnx": "try TorchScript or .pt2, or replace that op with standard ones",
              "torchscript": "try .pt2 (torch.export) or ONNX",
              "pt2": "try TorchScript or ONNX; torch.export needs a model without data-dependent Python control flow"}[fmt]
    return f"{fmt} export failed{where}: {type(exc).__name__}: {message[:160]}; {advice}."


def layer_calling(model: nn.Module, example_input: torch.Tensor, op: str) -> str | None:
    """Name of the innermost module running when ``op`` (``aten::name``) is first called; "" for the
    model's own forward, None when the op never runs (or the forward fails)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    found: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and func._schema.name == op:
                found.append(stack[-1] if stack else "")
            return func(*args, **(kwargs or {}))

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda _m, _i, name=name: stack.append(name) and None))
            handles.append(module.register_forward_hook(lambda _m, _i, _o: stack.pop() and None))
    try:
        with torch.no_grad(), Spy():
            model(example_input)
    except Exception:  # noqa: BLE001 - locating is a courtesy; the export error is the message
        return None
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


# --- writers: each returns the name of the exporter that wrote the file ----------------------------


def _write_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> str:
    names = {"input_names": ["input"], "output_names": ["output"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript-based exporter
            torch.onnx.export(model, (example_input,), str(path), dynamo=False, opset_version=OPSET,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **names)
        return "torch.onnx (TorchScript-based)"
    except Exception as first:  # noqa: BLE001 - the torch.export-based exporter may still succeed
        try:
            import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example_input,), str(path), dynamo=True, external_data=False,
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False, **names)
        except Exception:  # noqa: BLE001 - the first exporter's error names the op: report it
            raise first from None
        return "torch.onnx (torch.export-based)"


def _write_torchscript(model: nn.Module, example_input: torch.Tensor, path: Path) -> str:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values; the check below is the judge
        try:
            scripted, exporter = torch.jit.trace(model, (example_input,), check_trace=False), "torch.jit.trace"
        except Exception:  # noqa: BLE001 - a model the tracer cannot follow may still script
            scripted, exporter = torch.jit.script(model), "torch.jit.script"
    torch.jit.save(scripted, str(path))
    return exporter


def _write_pt2(model: nn.Module, example_input: torch.Tensor, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    return "torch.export"


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2}


def _grown(inputs: torch.Tensor) -> torch.Tensor:
    """The same rows with one more (the first repeated): a second batch size for the same file."""
    return torch.cat([inputs, inputs[:1]], dim=0)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
