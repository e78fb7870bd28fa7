"""Measured speed of 2:4 sparsity: PyTorch's semi-structured sparse tensors next to dense.

Zeros in a dense tensor make no kernel faster. The one exception for weight-level sparsity is
the 2:4 pattern (at most 2 non-zeros in every group of 4 consecutive inputs of a row) on NVIDIA
GPUs of compute capability 8.0 or newer (Ampere and later): their sparse tensor cores skip the
zeros, and `torch.sparse.to_sparse_semi_structured` packs a 2:4 weight for them (cuSPARSELt, or
CUTLASS where cuSPARSELt is missing). It takes 2-D CUDA weights in float16 / bfloat16 whose rows
and columns are multiples of a backend minimum (``SPARSE_MIN_SHAPE``, as torch's
``_DTYPE_SHAPE_CONSTRAINTS`` give them). Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks"; PyTorch's "Accelerating BERT with semi-structured sparsity" tutorial.

`unavailable_reason` and `layer_refusal` decide, as pure functions, whether a machine and a layer
qualify; `semi_structured_latency` times a 2:4 model both ways on a capable GPU, and otherwise
returns the reason in one sentence (on CPU: dense kernels do the same work on the zeros).
"""
from __future__ import annotations

import torch
from torch import nn

from explorer.layers import clone_model
from explorer.measure import compare_latency

HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
# (min rows, min cols) of the sparse weight, per backend and dtype (torch/sparse/semi_structured.py).
SPARSE_MIN_SHAPE = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}
CPU_REASON = ("No CUDA GPU here. On CPU, dense kernels multiply the zeros like any other weight, so a 2:4 model "
              "runs at about 1x the dense speed; only NVIDIA GPUs of compute capability 8.0+ (Ampere or newer) "
              "have sparse tensor cores that skip them.")


def unavailable_reason(cuda_available: bool, capability: tuple[int, int] | None = None,
                       device_name: str = "this GPU") -> str | None:
    """Why 2:4 sparse kernels cannot run here, or None when they can."""
    if not cuda_available:
        return CPU_REASON
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return (f"{device_name} has compute capability {shown}; 2:4 sparse tensor cores need 8.0 or newer "
                "(Ampere, Hopper...), so dense kernels would do the same work on the zeros (about 1x).")
    return None


def machine_reason() -> str | None:
    """`unavailable_reason` for this machine's first CUDA device."""
    if not torch.cuda.is_available():
        return unavailable_reason(False)
    return unavailable_reason(True, torch.cuda.get_device_capability(), torch.cuda.get_device_name())


def backend() -> str:
    """The backend torch converts to here: cuSPARSELt when it is built in, else CUTLASS."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every output row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    first_rows = weight.detach()[:8]  # a dense or unstructured weight fails in its first rows: skip the rest
    if not bool(((first_rows.reshape(-1, 4) != 0).sum(dim=1) <= 2).all()):
        return False
    return bool(((weight.detach().reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def layer_refusal(module: nn.Module, *, dtype: torch.dtype = torch.float16, kernel: str = "cusparselt") -> str | None:
    """Why one layer cannot take a semi-structured weight, or None when it can.

    Only ``nn.Linear`` qualifies (torch dispatches ``linear`` / ``addmm`` for the packed weight);
    its weight (out_features x in_features) must be 2:4 and both sides multiples of the backend's
    minimum block for ``dtype``.
    """
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__}, not a Linear (the kernels are matrix multiplies)"
    if dtype not in SPARSE_MIN_SHAPE[kernel]:
        return f"{dtype} is not a semi-structured dtype (float16 or bfloat16)"
    rows, cols = module.weight.shape
    min_rows, min_cols = SPARSE_MIN_SHAPE[kernel][dtype]
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return (f"weight {rows}x{cols}: {kernel} needs rows a multiple of {min_rows} and columns a multiple of "
                f"{min_cols}")
    if not is_2_4(module.weight):
        return "weight is not 2:4 sparse (kept dense, protected, or another N:M pattern)"
    return None


def eligible_layers(model: nn.Module, *, dtype: torch.dtype = torch.float16,
                    kernel: str = "cusparselt") -> tuple[list[str], dict[str, str]]:
    """(Linear layers that convert, {Linear layer: why not}) of a model with plain (folded) weights."""
    converted, refused = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = layer_refusal(module, dtype=dtype, kernel=kernel)
        if reason is None:
            converted.append(name)
        else:
            refused[name] = reason
    return converted, refused


def has_2_4_layer(model: nn.Module) -> bool:
    """True when some Linear of ``model`` (masks folded) carries a 2:4 weight: the case worth timing."""
    return any(isinstance(m, nn.Linear) and is_2_4(m.weight) for m in model.modules())


def semi_structured_latency(model: nn.Module, example_input: torch.Tensor, *, dtype: torch.dtype = torch.float16,
                            min_run_time: float = 0.5, time_it: bool = True) -> dict:
    """A 2:4 model timed with semi-structured weights next to the same model dense, on a capable GPU.

    ``model`` has plain weights (fold masks first). Both copies run in ``dtype`` on the first CUDA
    device, with the same input, interleaved and synchronised (`measure.compare_latency`). Returns
    ``{available: False, reason}`` where the kernels cannot run, else ``{available: True, device,
    capability, backend, dtype, batch, dense_ms, sparse_ms, speedup, layers_converted, layers_refused}``;
    with ``time_it`` False (latency not asked for) the times are None and ``reason`` says why.
    """
    reason = machine_reason()
    if reason is not None:
        return {"available": False, "reason": reason}
    kernel = backend()
    converted, refused = eligible_layers(model, dtype=dtype, kernel=kernel)
    if not converted:
        return {"available": False, "reason": "No Linear layer of this model has a 2:4 weight of a shape the "
                                              "kernels accept.", "layers_refused": refused}
    device = torch.device("cuda", torch.cuda.current_device())
    result = {"available": True, "reason": None, "device": torch.cuda.get_device_name(device),
              "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)), "backend": kernel,
              "dtype": str(dtype).replace("torch.", ""), "batch": int(example_input.shape[0]),
              "dense_ms": None, "sparse_ms": None, "speedup": None,
              "layers_converted": len(converted), "layers_refused": refused}
    if not time_it:
        result["reason"] = "Not timed: latency measurement is off."
        return result
    try:
        dense = clone_model(model).to(device=device, dtype=dtype).eval()
        sparse = clone_model(dense)
        modules = dict(sparse.named_modules())
        for name in converted:
            linear = modules[name]
            linear.weight = nn.Parameter(to_semi_structured(linear.weight.detach(), kernel), requires_grad=False)
        inputs = example_input.to(device)
        if inputs.is_floating_point():
            inputs = inputs.to(dtype)
        timing = compare_latency(dense, sparse, inputs, device=device, min_run_time=min_run_time, channels_last=False)
    except Exception as exc:  # noqa: BLE001 - a kernel or dtype refusal must not lose the run's other numbers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {**result, "available": False,
                "reason": f"The semi-structured kernels failed on this model in {result['dtype']} "
                          f"({type(exc).__name__}: {first})."}
    result.update(dense_ms=timing["dense"]["median_ms"], sparse_ms=timing["pruned"]["median_ms"],
                  speedup=timing["speedup_measured"])
    return result


def describe(result: dict | None, nm: str | None = None) -> str | None:
    """One line for a page: the measured 2:4 speed-up, or why there is none; None when there is nothing to say.

    ``nm`` is the run's N:M pattern, if any: a 4:8 run gets told that only 2:4 has kernels.
    """
    if result is None:
        if nm is not None and nm != "2:4":
            return (f"{nm} has no sparse kernel in PyTorch (semi-structured tensors take 2:4 only), so dense kernels "
                    "run it at about 1x.")
        return None
    if not result["available"]:
        return f"2:4 sparse kernels: {result['reason']}"
    where = f"{result['device']} (compute capability {result['capability']}, {result['backend']}, {result['dtype']})"
    if result.get("speedup") is None:
        return f"2:4 sparse kernels available on {where}. {result['reason'] or ''}".strip()
    return (f"2:4 sparse kernels on {where}: {result['dense_ms']:.3f} ms dense -> {result['sparse_ms']:.3f} ms "
            f"semi-structured, {result['speedup']:.2f}x at batch {result['batch']} "
            f"({result['layers_converted']} Linear layers converted, {len(result['layers_refused'])} kept dense).")


def to_semi_structured(weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """``weight`` packed for the sparse tensor cores with ``kernel`` (torch's own converter)."""
    if kernel == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(weight.contiguous())
    return torch.sparse.to_sparse_semi_structured(weight.contiguous())
