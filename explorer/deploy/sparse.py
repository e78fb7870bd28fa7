"""When unstructured sparsity pays: CSR kernels for Linear layers on the CPU, timed against dense.

Zeros in a dense weight cost the same as any other value. A weight stored in compressed sparse
row form (``torch.Tensor.to_sparse_csr``) is multiplied by torch's sparse kernels (MKL's on x86),
which skip the zeros but pay for indexing; below some sparsity they lose to the dense kernel.
`break_even` times one layer shape across sparsities with the app's paired timing and gives the
lowest sparsity from which CSR is faster at every higher one tested (Gale et al. 2020 and pytorch
#51647 put it near 90 % on CPUs). `sparsify` swaps each Linear of a pruned model for a `CsrLinear`
where, timed on its own real input, CSR wins; `compare_latency` then times the whole model end to
end against the same weights on dense kernels (the 1x).

torch's BSR and COO kernels were tried too (torch 2.13, CPU): both slower than dense at every
sparsity up to 99 % at batch 1 and 64 on 4096 x 4096, so CSR is the one kept.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from explorer import jobs, measure, timing
from explorer.backends import torch_threads
from explorer.layers import clone_model, fold_masks, is_masked

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


class CsrLinear(nn.Module):
    """``nn.Linear`` with its weight in CSR: ``y = (W_csr @ x^T)^T + b``.

    The output is the transpose of a contiguous (out, batch) product; a following `CsrLinear`
    takes its transpose back for free, so a chain of them never copies activations.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta": the timing is the judge here
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = (self.weight @ flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={1 - nnz / (self.in_features * self.out_features):.1%}")


def time_layer(weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor, *, threads: int,
               load: timing.Load, min_run_time: float = 0.05, max_run_time: float = 0.3) -> dict:
    """Dense ``F.linear`` against `CsrLinear` for one weight on ``inputs``: `timing.summarise`'s result.

    ``speedup_measured`` > 1 means CSR is faster; its interval and ``noisy`` come with it.
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    csr = CsrLinear(linear)
    calls = {"dense": lambda: linear(inputs), "csr": lambda: csr(inputs)}
    with torch.inference_mode(), torch_threads(threads):
        for call in calls.values():
            call()
        samples, _ = timing.time_alternating(calls, min_run_time=min_run_time, max_run_time=max_run_time)
    return timing.summarise(samples, load=load, busy_jobs=jobs.running_elsewhere())


def break_even(shape: tuple[int, int], *, batch: int = 1, sparsities: tuple[float, ...] = SPARSITIES,
               threads: int | None = None, max_run_time: float = 0.3, seed: int = 0) -> dict:
    """CSR vs dense for one (out, in) Linear shape at each sparsity (random weights, random mask).

    Returns ``{shape, batch, threads, rows: [{sparsity, dense_ms, csr_ms, speedup, speedup_interval,
    noisy}], break_even}``: ``break_even`` is the lowest tested sparsity from which CSR's median is
    faster at every higher sparsity, None when it never is.
    """
    load = timing.machine_load()
    threads, _ = timing.choose_threads(threads, torch.get_num_threads(), load)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    inputs = torch.randn(batch, shape[1], generator=generator)
    order = torch.rand(weight.numel(), generator=generator).argsort()  # a random mask, the same order each sparsity
    rows = []
    for sparsity in sparsities:
        masked = weight.flatten().clone()
        masked[order[:round(sparsity * weight.numel())]] = 0
        masked = masked.reshape(shape)
        summary = time_layer(masked, None, inputs, threads=threads, load=load, max_run_time=max_run_time)
        rows.append({"sparsity": sparsity, "dense_ms": summary["dense"]["median_ms"],
                     "csr_ms": summary["csr"]["median_ms"], "speedup": summary["speedup_measured"],
                     "speedup_interval": summary["speedup_interval"], "noisy": summary["noisy"]})
    return {"shape": list(shape), "batch": batch, "threads": threads, "load": load.to_dict(), "rows": rows,
            "break_even": break_even_point(rows)}


def break_even_point(rows: list[dict]) -> float | None:
    """Lowest sparsity from which every row at it and above has a speed-up above 1 (rows by sparsity)."""
    point = None
    for row in sorted(rows, key=lambda r: r["sparsity"], reverse=True):
        if row["speedup"] <= 1:
            break
        point = row["sparsity"]
    return point


def sparsify(model: nn.Module, example_input: torch.Tensor, *, threads: int | None = None,
             max_run_time: float = 0.3, progress=None, cancel=None) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` whose Linear layers run on CSR kernels where that is faster, and why each did or not.

    Each Linear is timed on the input it really receives (captured from one forward of
    ``example_input``), with its own weights, dense against CSR; it is swapped when CSR's median
    is faster. Masks are folded first. Returns the copy and one row per Linear: ``name``,
    ``shape``, ``sparsity``, ``speedup`` (CSR over dense, for that layer alone) and ``sparse``.
    ``progress(fraction, text)`` hears each layer; once ``cancel`` (a threading.Event) is set, the layers
    not timed yet stay dense and get no row.
    """
    deployed = fold_masks(model) if is_masked(model) else clone_model(model)
    deployed.eval()
    inputs: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0].detach()))
               for name, module in deployed.named_modules() if isinstance(module, nn.Linear)]
    try:
        with torch.no_grad():
            deployed(example_input)
    finally:
        for handle in handles:
            handle.remove()
    load = timing.machine_load()
    threads, _ = timing.choose_threads(threads, torch.get_num_threads(), load)
    rows = []
    linears = [(name, module) for name, module in deployed.named_modules()
               if isinstance(module, nn.Linear) and name in inputs]
    for index, (name, module) in enumerate(linears):
        if cancel is not None and cancel.is_set():
            break
        if progress is not None:
            progress(index / len(linears), f"timing {name} dense vs CSR")
        weight = module.weight.detach()
        summary = time_layer(weight, module.bias, inputs[name], threads=threads, load=load, max_run_time=max_run_time)
        faster = summary["speedup_measured"] > 1
        rows.append({"name": name, "shape": list(weight.shape), "sparsity": 1 - int(torch.count_nonzero(weight)) / weight.numel(),
                     "speedup": summary["speedup_measured"], "speedup_interval": summary["speedup_interval"],
                     "noisy": summary["noisy"], "sparse": faster})
        if faster:
            parent_name, _, child = name.rpartition(".")
            setattr(deployed.get_submodule(parent_name) if parent_name else deployed, child, CsrLinear(module))
    return deployed, rows


def end_to_end(model: nn.Module, example_input: torch.Tensor, *, threads: int | None = None,
               max_run_time: float | None = None, progress=None, cancel=None) -> dict:
    """`sparsify` ``model``, then time it whole against the same weights on dense kernels (`compare_latency`).

    Returns ``{layers, speedup, speedup_interval, noisy, noise, dense_ms, sparse_ms, batch, threads,
    max_abs_diff, cancelled}``; ``max_abs_diff`` checks the sparse copy computes what the dense one does.
    ``progress`` hears each layer and the end-to-end timing; a ``cancel`` keeps the layers timed so far and
    skips the end-to-end timing (its figures None, ``cancelled`` True).
    """
    report = (lambda fraction, text: progress(0.7 * fraction, text)) if progress is not None else None
    dense = fold_masks(model) if is_masked(model) else model
    sparse, layers = sparsify(dense, example_input, threads=threads, progress=report, cancel=cancel)
    with torch.no_grad():
        difference = float((sparse(example_input) - dense(example_input)).abs().max())
    cancelled = cancel is not None and cancel.is_set()
    if cancelled:
        return {"layers": layers, "dense_ms": None, "sparse_ms": None, "speedup": None, "speedup_interval": None,
                "noisy": None, "noise": None, "batch": int(example_input.shape[0]), "threads": threads,
                "max_abs_diff": difference, "cancelled": True}
    if progress is not None:
        progress(0.7, "timing the model end to end, CSR where it wins vs dense kernels")
    timed = measure.compare_latency(dense, sparse, example_input, threads=threads, max_run_time=max_run_time,
                                    channels_last=False)
    return {"layers": layers, "dense_ms": timed["dense"]["median_ms"], "sparse_ms": timed["pruned"]["median_ms"],
            "speedup": timed["speedup_measured"], "speedup_interval": timed["speedup_interval"],
            "noisy": timed["noisy"], "noise": timed["noise"], "batch": timed["dense"]["batch"],
            "threads": timed["dense"]["threads"], "max_abs_diff": difference, "cancelled": False}
