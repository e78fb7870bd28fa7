"""Honest numbers for any model: parameters, FLOPs, file size, latency, peak memory.

Nothing here knows how a model was pruned. A masked model (``torch.nn.utils.prune``), a
model with channels physically removed, and a dense model are measured the same way, so
the dashboard can put *theoretical* gains (fewer non-zero parameters, fewer effective
FLOPs) next to *measured* ones (latency, compressed file size). The lesson they show:
zeros inside a dense tensor shrink the compressed file but not the latency; removing
channels shrinks latency and memory.

Every number carries its unit in its name: ``flops``, ``latency_ms``, ``size_bytes``.
"""
from __future__ import annotations

import collections
import contextlib
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from explorer import jobs, timing
from explorer.layers import clone_model, effective_tensors, effective_weights, fold_masks, is_masked, model_device, on_device


def as_deployed(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a masked model a copy with its masks folded in (zeros kept)."""
    return fold_masks(model) if is_masked(model) else model


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and non-zero parameters; a masked weight counts its masked entries as zeros.

    ``torch.nn.utils.prune`` keeps the dense ``weight_orig`` as the parameter and computes
    ``weight = weight_orig * weight_mask``; we count that effective ``weight``. Shared
    parameters are counted once.
    """
    total = nonzero = 0
    for tensor in effective_tensors(model).values():
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    return {"total": total, "nonzero": nonzero}


def flops(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Forward FLOPs of one batch, dense and effective, overall and per layer.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, whose convention is **2 FLOPs
    per multiply-accumulate** (a conv is ``2·Cout·Cin/groups·k·k·Hout·Wout`` per sample) and
    which counts matmul/conv-like ops only (no bias adds, activations or norms).
    ``effective`` scales each layer's dense count by the density of its weight (non-zero
    fraction, masks applied): what a sparse kernel could at best skip. ``per_layer`` is
    keyed by module name.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused transformer kernel is invisible to the counter
    try:
        with _inference(model):
            counter = FlopCounterMode(display=False)
            with counter:
                model(example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    dense_total = int(sum(counts.get("Global", {}).values()))
    weights = effective_weights(model)
    per_layer = {}
    for name, module in model.named_modules():
        key = f"{prefix}.{name}" if name else prefix
        if isinstance(module, nn.MultiheadAttention) and key in counts:
            per_layer.update(_attention_flops(name, module, counts[key], weights))
            continue
        if name == "" or any(True for _ in module.children()) or key not in counts:
            continue
        dense = int(sum(counts[key].values()))
        weight = weights.get(name)
        density = float(torch.count_nonzero(weight)) / weight.numel() if weight is not None and weight.numel() else 1.0
        per_layer[name] = {"dense": dense, "effective": int(round(dense * density))}
    saved = sum(layer["dense"] - layer["effective"] for layer in per_layer.values())
    return {"dense": dense_total, "effective": dense_total - saved, "per_layer": per_layer}


def _attention_flops(name: str, module: nn.Module, counts: dict, weights: dict) -> dict[str, dict]:
    """An attention's projection FLOPs, split between its ``in_proj`` (the attention's own entry) and ``out_proj``.

    The attention never calls ``out_proj``, so the counter files every FLOP under the attention: its
    matrix products (``mm`` / ``addmm``) are the two projections, split by their weights' sizes (exact for
    self-attention); the products between heads (query x key, weights x value) stay unattributed.
    """
    projections = int(sum(value for op, value in counts.items() if str(op) in ("aten.mm", "aten.addmm")))
    sizes = {name: module.in_proj_weight.numel(), f"{name}.out_proj": module.out_proj.weight.numel()}
    result = {}
    for layer, size in sizes.items():
        dense = int(round(projections * size / sum(sizes.values())))
        weight = weights.get(layer)
        density = float(torch.count_nonzero(weight)) / weight.numel() if weight is not None and weight.numel() else 1.0
        result[layer] = {"dense": dense, "effective": int(round(dense * density))}
    return result


def latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    min_run_time: float = 0.5,
    max_run_time: float | None = None,
    warmup: int = 3,
) -> dict:
    """Median wall-clock time of one forward pass (eval mode, no autograd), with its 95 % interval.

    The same sampling as `compare_latency` with one model: many short samples until the median's
    interval is within 5 % or the time cap passes, samples that lost their core left out, threads
    no more than the free cores unless asked. Returns the model's summary (``median_ms``,
    ``interval_ms``, ``low_ms``, ``iqr_ms``, device, batch, threads, layout) plus ``noisy`` and
    ``noise``. The batch is the example's first dimension; the model is copied if it must move device.
    """
    result = compare_latency(model, None, example_input, device=device, threads=threads,
                             min_run_time=min_run_time, max_run_time=max_run_time, warmup=warmup)
    return {**result["dense"], **{key: result[key] for key in ("noisy", "noise", "threads_note", "load", "seconds")}}


def compare_latency(
    dense_model: nn.Module,
    pruned_model: nn.Module | None,
    example_input: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    min_run_time: float = 0.5,
    max_run_time: float | None = None,
    tolerance: float = timing.TOLERANCE,
    warmup: int = 3,
    channels_last: bool | None = None,
) -> dict:
    """Time two models with the same input, batch, device, threads and layout: a ratio with its interval.

    The models are timed sample by sample in alternating order and each pair gives one ratio
    (`explorer.timing`); ``speedup_measured`` is the median ratio, ``speedup_interval`` its 95 %
    interval. Timing runs at least ``min_run_time`` seconds and stops once the interval is within
    ``tolerance`` of the median, or after ``max_run_time`` (default the larger of 3 s and
    ``min_run_time``); an interval still wider is ``noisy``, and ``noise`` says why (machine load,
    a job of this app running beside it, samples that lost their core). ``threads`` None times on
    torch's thread count, lowered to the cores that are free (``threads_note`` says so).

    ``channels_last`` (default: on for 4-D image inputs) times copies of both models and the input
    in the channels-last memory format, which oneDNN's convolutions prefer on CPU. A masked model is
    timed as deployed (`as_deployed`: masks folded, zeros kept), so the pruning hook's own overhead is
    never mistaken for the cost of sparsity. Per model: ``median_ms`` (samples that kept their core),
    ``interval_ms`` (its 95 % interval), ``low_ms`` (10th percentile: the uncontended estimate),
    ``iqr_ms``. ``pairs_ms`` holds the raw kept samples, ``[dense, pruned]`` per pair.
    """
    device = torch.device(device) if device is not None else model_device(dense_model)
    load = timing.machine_load()
    busy_jobs = jobs.running_elsewhere()
    threads, threads_note = timing.choose_threads(threads, torch.get_num_threads(), load, cpu=device.type == "cpu")
    inputs = example_input.to(device)
    models = {"dense": dense_model} if pruned_model is None else {"dense": dense_model, "pruned": pruned_model}
    prepared = {label: on_device(as_deployed(m), device) for label, m in models.items()}
    if channels_last is None:
        channels_last = inputs.dim() == 4
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        prepared = {label: clone_model(m).to(memory_format=torch.channels_last) for label, m in prepared.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    check_cpu = device.type == "cpu"
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode(), contextlib.ExitStack() as modes:
            for model in prepared.values():
                modes.enter_context(_eval(model))
                for _ in range(warmup):
                    model(inputs)
            sync()
            calls = {label: (lambda model=model: model(inputs)) for label, model in prepared.items()}
            samples, _ = timing.time_alternating(
                calls, sync=sync, min_run_time=min_run_time,
                max_run_time=max(timing.MAX_RUN_TIME_S, min_run_time) if max_run_time is None else max_run_time,
                tolerance=tolerance, check_cpu=check_cpu)
    finally:
        torch.set_num_threads(previous_threads)
    summary = timing.summarise(samples, load=load, busy_jobs=sorted(set(busy_jobs) | set(jobs.running_elsewhere())),
                               tolerance=tolerance, check_cpu=check_cpu)
    result = {label: {**summary.pop(label), "device": str(device), "threads": threads,
                      "batch": int(inputs.shape[0]) if inputs.dim() else 1,
                      "layout": "channels_last" if channels_last else "contiguous"}
              for label in prepared}
    result.update(summary, threads_note=threads_note or None)
    return result


DEFLATE_BLOCK = 16 << 20  # compressed sizes deflate the serialised file in independent blocks of 16 MiB


def compressed_size_bytes(model: nn.Module, *, level: int = 6) -> dict[str, int]:
    """Serialised state-dict size, raw and deflate-compressed.

    Masks are made permanent first (only effective weights are saved, no ``*_orig`` or
    ``*_mask``), so a masked and a truly sparse model of equal weights weigh the same.
    Raw size does not shrink with zeros; the compressed size does: this is where
    unstructured sparsity pays. Deflate runs with zlib's run-length strategy (``Z_RLE``): float
    weights hold almost no repeated strings for the default strategy's search to find, only zero
    runs and skewed byte statistics, which run-length plus Huffman coding capture as well (sizes
    within about 1 % of the default strategy's) about five times faster, 100 MB/s on one core. The file is
    deflated in independent blocks of `DEFLATE_BLOCK` bytes on two threads (pigz's ``--independent``: each
    block a whole zlib stream; a run-length coder loses only the run across each boundary and 11 bytes of
    framing, 0.0001 % of a 16 MiB block), so both cores work: a 0.5 GB GPT-2 in ~2 s instead of ~4.
    """
    sink = _DeflateCounter(level, zlib.Z_RLE, block=DEFLATE_BLOCK)
    torch.save(as_deployed(model).state_dict(), sink)
    return {"raw": sink.raw, "compressed": sink.finish()}


def file_size_bytes(path, *, level: int = 6) -> dict[str, int]:
    """A file's size, raw and deflate-compressed (zlib ``level``), read in 1 MiB chunks: neither the file
    nor its compressed copy is held in memory (an exported 1 B model is 4 GB)."""
    sink = _DeflateCounter(level)
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            sink.write(chunk)
    return {"raw": sink.raw, "compressed": sink.finish()}


class _DeflateCounter:
    """A write-only file that counts the bytes written and their deflate size, keeping neither.

    The same numbers as ``len(raw)`` and ``len(zlib.compress(raw, level))`` of the whole buffer, without
    holding the serialised model (and its compressed copy) in memory: a 1 B model would need 8 GB for both.
    With ``block``, the deflate size is that of each ``block`` bytes compressed on its own (the sum of
    ``len(zlib.compress(piece))``), two blocks at a time on threads (zlib lets go of the GIL), at most four
    blocks in memory.
    """

    def __init__(self, level: int, strategy: int = zlib.Z_DEFAULT_STRATEGY, *, block: int | None = None):
        self.raw, self.compressed = 0, 0
        self._level, self._strategy, self._block = level, strategy, block
        self._deflate = None if block else self._new()
        self._pending, self._pool, self._running = bytearray(), None, collections.deque()

    def _new(self):
        return zlib.compressobj(self._level, zlib.DEFLATED, zlib.MAX_WBITS, 8, self._strategy)

    def _size(self, piece: bytes) -> int:
        deflate = self._new()
        return len(deflate.compress(piece)) + len(deflate.flush())

    def _submit(self, piece: bytes) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deflate")
        self._running.append(self._pool.submit(self._size, piece))
        while len(self._running) > 2:
            self.compressed += self._running.popleft().result()

    def write(self, data) -> int:
        size = len(data)
        self.raw += size
        if self._block is None:
            self.compressed += len(self._deflate.compress(data))
            return size
        view = memoryview(data).cast("B")
        if self._pending:
            take = self._block - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < self._block:
                return size
            self._submit(bytes(self._pending))
            self._pending = bytearray()
        while len(view) >= self._block:  # a tensor's storage comes in one write: cut it without copying it whole
            self._submit(bytes(view[:self._block]))
            view = view[self._block:]
        self._pending += view
        return size

    def flush(self) -> None:
        """torch.save may flush; counting has nothing to flush until `finish`."""

    def finish(self) -> int:
        if self._block is None:
            self.compressed += len(self._deflate.flush())
            return self.compressed
        if self._pending or not self.raw:
            self._submit(bytes(self._pending))
            self._pending = bytearray()
        while self._running:
            self.compressed += self._running.popleft().result()
        if self._pool is not None:
            self._pool.shutdown()
        return self.compressed


def peak_memory_bytes(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Peak memory of one inference forward pass, and how it was obtained.

    On CUDA this is ``torch.cuda.max_memory_allocated`` around the pass (parameters,
    activations and workspace; ``method="cuda_max_memory_allocated"``). On CPU there is no
    allocator statistic, so we estimate: parameter and buffer bytes plus the input plus
    every leaf module's output bytes (``method="estimate_params_plus_activations"``), an
    upper bound for inference that also approximates what training keeps for backward. The
    outputs are summed at batches 1 and 2 and extended linearly to the example's batch, the same
    sum without a full-batch pass (on a language model that pass alone holds batch x length x vocab logits).
    """
    device = model_device(model)
    if device.type == "cuda":
        inputs = example_input.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with _inference(model):
            model(inputs)
        torch.cuda.synchronize(device)
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "method": "cuda_max_memory_allocated",
                "device": str(device)}
    batch = example_input.shape[0] if example_input.dim() else 1
    if batch > 2:  # every output grows linearly with the batch: two small passes give the sum at any batch
        one, two = (_activation_bytes(model, example_input[:size], device) for size in (1, 2))
        activations = one + (batch - 1) * (two - one)
    else:
        activations = _activation_bytes(model, example_input, device)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"bytes": int(state_bytes + activations), "method": "estimate_params_plus_activations",
            "device": str(device)}


def _activation_bytes(model: nn.Module, example_input: torch.Tensor, device) -> int:
    """The input's bytes plus every leaf module's output bytes in one inference pass."""
    activation_bytes = [example_input.numel() * example_input.element_size()]

    def record(_module, _inputs, output):
        for tensor in _tensors_in(output):
            activation_bytes.append(tensor.numel() * tensor.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with _inference(model):
            model(example_input.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sum(activation_bytes)


@dataclass
class Metrics:
    """The standard numbers of one model (and, with a baseline, its speed-ups).

    ``speedup_flops`` is baseline effective FLOPs / this model's effective FLOPs (the
    theoretical promise); ``speedup_measured`` is the median of baseline / this model's latency
    over pairs of samples timed alternately with the same batch and threads, and
    ``speedup_interval`` its 95 % interval (`compare_latency`). Side by side they show whether a
    pruning structure pays in practice. ``speedup_noisy`` marks a figure whose interval stayed
    wider than +-5 %; ``speedup_noise`` says why (load, a job beside it). ``timing`` keeps how it was
    timed: pairs kept and dropped, seconds, machine load, a note on threads, the raw kept pairs
    (``pairs_ms``). FLOPs are per input (one example); latency is per ``batch`` inputs, on
    ``device`` with ``threads`` threads and the memory ``layout`` named.
    """

    params_total: int
    params_nonzero: int
    flops_dense: int
    flops_effective: int
    size_raw_bytes: int
    size_compressed_bytes: int
    peak_memory_bytes: int | None
    peak_memory_method: str
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    latency_interval_ms: list[float] | None = None
    device: str | None = None
    batch: int | None = None
    threads: int | None = None
    layout: str | None = None
    baseline_params_total: int | None = None
    baseline_flops_effective: int | None = None
    baseline_size_compressed_bytes: int | None = None
    baseline_latency_ms: float | None = None
    speedup_flops: float | None = None
    speedup_measured: float | None = None
    speedup_interval: list[float] | None = None
    speedup_noisy: bool | None = None
    speedup_noise: str | None = None
    timing: dict | None = None
    compression_ratio: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def report(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    baseline: nn.Module | None = None,
    latency: bool = True,
    device: str | torch.device | None = None,
    threads: int | None = None,
    min_run_time: float = 0.5,
    max_run_time: float | None = None,
    memory: bool = True,
    baseline_figures: dict | None = None,
) -> Metrics:
    """Measure ``model`` (and compare with ``baseline`` if given) in one call.

    Masked models are measured as deployed (`as_deployed`), whoever calls: a metric never
    needs to know how a model was pruned. The baseline's own counts are `remembered`, so
    measuring several pruned copies against one base measures the base once.
    ``baseline_figures`` (`baseline_figures` of the base, taken earlier or read from a cache) stand
    in for ``baseline`` when the base is gone (pruned in place) or was measured in another process.
    ``memory=False`` skips the peak-memory estimate (a forward pass) for a caller that never shows it.
    """
    model = as_deployed(model)
    baseline = as_deployed(baseline) if baseline is not None else None
    one_input = example_input[:1]
    params = count_params(model)
    model_flops = flops(model, one_input)
    size = compressed_size_bytes(model)
    peak = peak_memory_bytes(model, example_input) if memory else {"bytes": None, "method": "not measured"}
    metrics = Metrics(
        params_total=params["total"], params_nonzero=params["nonzero"],
        flops_dense=model_flops["dense"], flops_effective=model_flops["effective"],
        size_raw_bytes=size["raw"], size_compressed_bytes=size["compressed"],
        peak_memory_bytes=peak["bytes"], peak_memory_method=peak["method"],
    )
    if baseline_figures is None and baseline is not None:
        baseline_figures = measure_baseline(baseline, one_input)
    if baseline_figures is not None:
        base_flops, base_size = baseline_figures["flops_effective"], baseline_figures["size_compressed_bytes"]
        metrics.baseline_params_total = baseline_figures["params_total"]
        metrics.baseline_flops_effective = base_flops
        metrics.baseline_size_compressed_bytes = base_size
        metrics.speedup_flops = base_flops / max(1, model_flops["effective"])
        metrics.compression_ratio = base_size / max(1, size["compressed"])
    if latency:
        for key, value in latency_metrics(model, example_input, baseline=baseline, device=device, threads=threads,
                                          min_run_time=min_run_time, max_run_time=max_run_time).items():
            setattr(metrics, key, value)
    return metrics


def measure_baseline(baseline: nn.Module, example_input: torch.Tensor) -> dict:
    """The base model's figures `report` sets beside a pruned copy: ``params_total``, ``flops_effective``
    (per input of ``example_input``'s shape) and ``size_compressed_bytes``; each `remembered`."""
    baseline = as_deployed(baseline)
    one_input = example_input[:1]
    return {
        "params_total": remembered(baseline, ("params",), lambda: count_params(baseline))["total"],
        "flops_effective": remembered(baseline, ("flops", tuple(one_input.shape), one_input.dtype),
                                      lambda: flops(baseline, one_input))["effective"],
        "size_compressed_bytes": remembered(baseline, ("size",), lambda: compressed_size_bytes(baseline))["compressed"],
    }


def latency_metrics(model: nn.Module, example_input: torch.Tensor, *, baseline: nn.Module | None = None,
                    device: str | torch.device | None = None, threads: int | None = None, min_run_time: float = 0.5,
                    max_run_time: float | None = None) -> dict:
    """The latency fields of `Metrics` (``model`` timed against ``baseline`` when given): `report`'s last
    stage, on its own so a caller can report it as a stage and skip it when cancelled."""
    model = as_deployed(model)
    baseline = as_deployed(baseline) if baseline is not None else None
    timed = compare_latency(baseline if baseline is not None else model,
                            model if baseline is not None else None, example_input,
                            device=device, threads=threads, min_run_time=min_run_time,
                            max_run_time=max_run_time)
    own = timed["pruned"] if baseline is not None else timed["dense"]
    fields = {"latency_ms": own["median_ms"], "latency_iqr_ms": own["iqr_ms"], "latency_interval_ms": own["interval_ms"],
              "device": own["device"], "batch": own["batch"], "threads": own["threads"], "layout": own["layout"],
              "timing": {key: timed.get(key) for key in
                         ("pairs", "pairs_dropped", "seconds", "load", "threads_note", "during_jobs", "pairs_ms")},
              "speedup_noisy": timed["noisy"], "speedup_noise": timed["noise"]}
    fields["timing"]["baseline_interval_ms"] = timed["dense"]["interval_ms"]
    if baseline is not None:
        fields.update(baseline_latency_ms=timed["dense"]["median_ms"], speedup_measured=timed["speedup_measured"],
                      speedup_interval=timed["speedup_interval"])
    return fields


_REMEMBERED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def remembered(model: nn.Module, key: tuple, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per model and ``key`` while the model's tensors stay the same.

    The base model is measured again with every pruned copy (each sparsity, each Apply); its
    FLOPs and compressed size (seconds for a transformer: deflate of the whole state dict) do not
    change while its tensors do not. The memo is keyed by the model object (weakly: it goes with
    the model) and checked against every parameter's and buffer's storage and version counter, so
    an in-place edit (training, regrowth, a mask) or a structural change recomputes.
    """
    fingerprint = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    entries = _REMEMBERED.setdefault(model, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    value = compute()
    entries[key] = (fingerprint, value)
    return value


# --- internals -------------------------------------------------------------------------


@contextmanager
def _eval(model: nn.Module):
    """Eval mode for the duration, then every module's own flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _inference(model: nn.Module):
    with _eval(model), torch.no_grad():
        yield model


def _tensors_in(output):
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (list, tuple)):
        for item in output:
            yield from _tensors_in(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors_in(item)
