"""`load_model`, the one door through which models enter, and `save_model`, its mirror.

The architectures themselves live in `explorer.zoo` (re-exported here as `ZOO` and `build`).

Loading is defensive: model files come from users. State dicts are read with
``weights_only=True``; pickled ``nn.Module`` files are refused unless the caller opts in with
``trust_pickle=True``; every failure raises `ExplorerError` with a message that says what to do.
"""
from __future__ import annotations

import importlib
import inspect
import io
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.layers import clone_model
from explorer.zoo import ZOO, ZooEntry, build  # noqa: F401 - re-exported: the zoo is part of the model API

SAVE_FORMAT = "pruning-explorer/model-v1"


# --------------------------------------------------------------------------- loading
def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ExplorerError(f"Model file '{path}' does not exist. Check the path.")
    if path.is_dir():
        raise ExplorerError(f"'{path}' is a folder; give the path of a model file.")
    data = path.read_bytes()
    if not data:
        raise ExplorerError(f"Model file '{path}' is empty. Save the model again and retry.")
    return data


def _is_torchscript(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names)


def _resize_to_state(model: nn.Module, state: dict[str, torch.Tensor], attributes: dict[str, dict]) -> None:
    """Reshape a fresh architecture so a structurally pruned state dict fits it."""
    modules = dict(model.named_modules())
    for module_name, attrs in attributes.items():
        module = modules.get(module_name)
        if module is None:
            raise ExplorerError(f"The saved model has a layer '{module_name}' that this architecture lacks.")
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state.items():
        module_name, _, tensor_name = key.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            continue
        if tensor_name in module._parameters and module._parameters[tensor_name] is not None:
            if module._parameters[tensor_name].shape != tensor.shape:
                module._parameters[tensor_name] = nn.Parameter(torch.empty_like(tensor))
        elif tensor_name in module._buffers and module._buffers[tensor_name] is not None:
            if module._buffers[tensor_name].shape != tensor.shape:
                module._buffers[tensor_name] = torch.empty_like(tensor)


_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                     "num_attention_heads", "all_head_size",  # heads removed from a Hugging Face transformer
                     "num_heads", "head_dim")  # heads removed from an nn.MultiheadAttention


def save_model(model: nn.Module, path: str | Path, *, arch: str, input_shape: tuple[int, ...],
               num_classes: int, metadata: dict | None = None) -> Path:
    """Save a (possibly pruned) model so `load_model` reads it back safely (``weights_only``).

    The file holds the effective weights (masks made permanent) plus each layer's channel
    counts, so a channel-pruned model is rebuilt from its architecture name (a zoo name or a
    ``module:callable`` factory) and reshaped before the weights go in: no pickled code.
    """
    model = clone_model(model, fold_masks=True)
    attributes = {}
    for name, module in model.named_modules():
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRIBUTES if isinstance(getattr(module, a, None), int)}
        if attrs:
            attributes[name] = attrs
    payload = {
        "format": SAVE_FORMAT,
        "arch": arch,
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "attributes": attributes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        raise ExplorerError(f"Importing '{module_name}' for factory '{spec}' called sys.exit({exc.code!r}); "
                            "a model module must import without exiting.") from None
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ExplorerError(f"Cannot import '{module_name}' for factory '{spec}': {exc}. "
                            "Check the module is on PYTHONPATH and imports cleanly.") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ExplorerError(f"Module '{module_name}' has no attribute '{attr}'. Check the factory name.")
    if not callable(factory):
        raise ExplorerError(f"'{spec}' is not callable; point to a function or class that builds the model.")
    return factory


def _call_factory(spec: str, input_shape: tuple[int, ...] | None, num_classes: int | None) -> nn.Module:
    factory = _import_factory(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {}
    if "input_shape" in params and input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    if "num_classes" in params and num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except SystemExit as exc:  # a factory must return a model, never end the program (or the app's server)
        raise ExplorerError(f"Factory '{spec}' called sys.exit({exc.code!r}) instead of returning a model; "
                            "make it return the torch.nn.Module.") from None
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"Factory '{spec}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExplorerError(f"Factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module. "
                            "Make it return the model.")
    return model


def _hf_builtin() -> dict[str, str]:
    from explorer.hf import BUILTIN

    return BUILTIN


def _build_arch(arch: str, input_shape, num_classes) -> nn.Module:
    if arch in ZOO:
        if input_shape is None or num_classes is None:
            raise ExplorerError(f"Building zoo model '{arch}' needs the input shape and class count "
                                "(pick a dataset).")
        return build(arch, input_shape, num_classes)
    if arch.startswith("hf:") or arch in _hf_builtin():
        from explorer import hf

        if arch.startswith("hf:"):
            return hf.load_hf(arch[3:]).model
        return hf.builtin(arch, num_labels=num_classes or 2).model
    if ":" in arch:
        return _call_factory(arch, input_shape, num_classes)
    raise ExplorerError(f"Unknown architecture '{arch}': give a zoo name ({', '.join(ZOO)}) "
                        "or a 'package.module:callable' factory.")


def load_state(model: nn.Module, state: dict, source: str) -> nn.Module:
    """Load a state dict into ``model``, turning shape or key mismatches into a clear message."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExplorerError(f"'{source}' does not hold a state dict (a mapping of names to tensors).")
    result_missing, result_unexpected, wrong_shape = [], [], []
    own = model.state_dict()
    for key, tensor in state.items():
        if key not in own:
            result_unexpected.append(key)
        elif own[key].shape != tensor.shape:
            wrong_shape.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
    result_missing = [k for k in own if k not in state]
    if result_missing or result_unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape mismatch (" + "; ".join(wrong_shape[:3]) + ")")
        if result_missing:
            parts.append(f"{len(result_missing)} missing key(s) e.g. {result_missing[0]}")
        if result_unexpected:
            parts.append(f"{len(result_unexpected)} unexpected key(s) e.g. {result_unexpected[0]}")
        raise ExplorerError(f"The weights in '{source}' do not fit this architecture: {', '.join(parts)}. "
                            "Pick the architecture (and dataset) the weights were trained with.")
    model.load_state_dict(state)
    return model


def _load_weights_file(path: Path, data: bytes) -> dict:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load as load_safetensors
            return load_safetensors(data)
        except Exception as exc:  # noqa: BLE001
            raise ExplorerError(f"'{path.name}' is not a readable safetensors file ({exc}). "
                                "The file may be truncated; save it again.") from exc
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"'{path.name}' is not a readable weights file ({type(exc).__name__}). "
                            "It may be truncated or corrupt; save it again.") from exc


def load_model(spec: str | Path, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
               weights: str | Path | None = None, arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Load a model from a zoo name, a file, or a ``package.module:callable`` factory.

    - zoo name (``resnet20``): built for ``input_shape`` / ``num_classes``; ``weights`` optional.
    - ``pkg.mod:fn`` factory: called (with ``input_shape`` / ``num_classes`` if it takes them);
      ``weights`` optional.
    - ``.pt2``: a ``torch.export`` program, returned as a runnable module.
    - TorchScript archive (``.pt``/``.pth``/``.ts``): loaded with ``torch.jit.load``.
    - a file written by `save_model`: rebuilt from its architecture, pruned shapes included.
    - a state dict (``.pt``/``.pth``/``.safetensors``): needs ``arch`` (zoo name or factory).
    - a pickled ``nn.Module``: refused unless ``trust_pickle=True`` (unpickling runs code).
    """
    spec_text = str(spec)
    if weights is None and spec_text in ZOO:
        return _build_arch(spec_text, input_shape, num_classes)
    if spec_text in ZOO or (":" in spec_text and not Path(spec_text).exists()):
        model = _build_arch(spec_text, input_shape, num_classes)
        if weights is not None:
            path = Path(weights)
            state = _load_weights_file(path, _read_bytes(path))
            if isinstance(state, dict) and state.get("format") == SAVE_FORMAT:
                return _from_saved(state, path, input_shape, num_classes, chosen=spec_text)
            load_state(model, state, path.name)
        return model

    path = Path(spec_text)
    data = _read_bytes(path)
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001
            raise ExplorerError(f"'{path.name}' is not a readable torch.export program ({type(exc).__name__}). "
                                "Export it again with torch.export.save.") from exc
        return program.module()
    if _is_torchscript(data):
        try:
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ExplorerError(f"'{path.name}' looks like TorchScript but cannot be loaded ({exc}). "
                                "It may be truncated; save it again with torch.jit.save.") from exc
    if path.suffix == ".safetensors":
        state = _load_weights_file(path, data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            if _looks_pickled_module(exc):
                if not trust_pickle:
                    raise ExplorerError(
                        f"'{path.name}' is a pickled model: loading it runs arbitrary code from the file. "
                        "Re-save it as a state dict or TorchScript, or, only if you trust its source, "
                        "allow pickled models (--trust-pickle / the app's 'I trust this file').") from exc
                return _load_pickled(path, data)
            raise ExplorerError(f"'{path.name}' is not a readable model file ({type(exc).__name__}). "
                                "It may be truncated or corrupt; save it again.") from exc
    if isinstance(state, nn.Module):
        return state
    if isinstance(state, dict) and state.get("format") == SAVE_FORMAT:
        return _from_saved(state, path, input_shape, num_classes, chosen=arch)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExplorerError(f"'{path.name}' holds a {type(state).__name__}, not a model or a state dict.")
    if arch is None:
        raise ExplorerError(f"'{path.name}' holds only weights (a state dict). Also choose the architecture "
                            "they belong to: a zoo name or a 'package.module:callable' factory.")
    model = _build_arch(arch, input_shape, num_classes)
    return load_state(model, state, path.name)


def _looks_pickled_module(exc: Exception) -> bool:
    """A refused global (a class to import) means pickled code; anything else is a damaged file."""
    text = str(exc)
    return "Unsupported global" in text or "GLOBAL " in text


def _load_pickled(path: Path, data: bytes) -> nn.Module:
    try:
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"'{path.name}' could not be unpickled ({type(exc).__name__}: {exc}). "
                            "The classes it needs must be importable here.") from exc
    if not isinstance(model, nn.Module):
        raise ExplorerError(f"'{path.name}' unpickled to a {type(model).__name__}, not a torch.nn.Module.")
    return model


def saved_arch(named, path: Path, chosen: str | None = None) -> str:
    """The architecture to rebuild a saved file with: the user's ``chosen`` one, else what the file names.

    A file is data, often someone else's: the architecture it names may be a zoo name or a transformer
    (neither runs code from anywhere but this project and transformers), never an import path, which
    would import and call whatever the file says. A factory runs only if the user named it
    (``--arch``, a ``pkg.mod:fn --weights FILE`` source, the app's factory field).
    """
    if chosen is not None:
        return chosen
    if not isinstance(named, str) or not named:
        raise ExplorerError(f"'{path.name}' names no architecture; choose it (a zoo name, or --arch pkg.mod:fn).")
    if named in ZOO or named in _hf_builtin() or named.startswith("hf:"):
        return named
    raise ExplorerError(f"'{path.name}' names its architecture as '{named}', which is not a zoo model; a file never "
                        f"chooses code to run: if you trust that factory, name it yourself (--arch {named}, or the "
                        "app's factory field).")


def _from_saved(payload: dict, path: Path, input_shape, num_classes, chosen: str | None = None) -> nn.Module:
    shape = tuple(payload.get("input_shape") or input_shape or ())
    classes = payload.get("num_classes") or num_classes
    model = _build_arch(saved_arch(payload.get("arch"), path, chosen), shape, classes)
    _resize_to_state(model, payload["state_dict"], payload.get("attributes", {}))
    from explorer.mha import restore_pruned  # an attention that lost heads needs its pruned forward back

    restore_pruned(model)
    return load_state(model, payload["state_dict"], path.name)


def read_saved_metadata(path: str | Path) -> dict:
    """Architecture, input shape, class count and metadata of a file written by `save_model`."""
    path = Path(path)
    payload = _load_weights_file(path, _read_bytes(path))
    if not (isinstance(payload, dict) and payload.get("format") == SAVE_FORMAT):
        raise ExplorerError(f"'{path.name}' was not written by Pruning Explorer's save_model.")
    return {k: payload[k] for k in ("arch", "input_shape", "num_classes", "metadata")}
