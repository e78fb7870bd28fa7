"""Built-in architectures (the zoo) and `load_model`, the one door through which models enter.

The zoo is chosen so every pruning concept has a model that shows it: an MLP (neurons), LeNet-5
(a small CNN), a plain VGG-style conv + BatchNorm stack (filters without coupling), ResNet-20
(residual adds couple channels into groups), a small MobileNetV2 (depthwise convs and inverted
residuals: the hard case) and a 1-D conv net for mnist1d. Every factory takes the dataset's
input shape and class count, so the same name works on digits, mnist1d or synthetic images.

Loading is defensive: model files come from users. State dicts are read with
``weights_only=True``; pickled ``nn.Module`` files are refused unless the caller opts in with
``trust_pickle=True``; every failure raises `ExplorerError` with a message that says what to do.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import io
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from explorer.errors import ExplorerError

SAVE_FORMAT = "pruning-explorer/model-v1"


# --------------------------------------------------------------------------- architectures
def _flat_size(input_shape: tuple[int, ...]) -> int:
    size = 1
    for dim in input_shape:
        size *= int(dim)
    return size


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 128)) -> nn.Module:
    """Fully connected net: flatten, then Linear + ReLU layers, then the classifier."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = _flat_size(input_shape)
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append(("classifier", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


class LeNet5(nn.Module):
    """LeNet-5 with 'same' padding so it also fits 8x8 digits: two conv + pool stages, three FC."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(channels, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5, padding=2)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ]))
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(flat, 120)), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(84, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class VGGSmall(nn.Module):
    """Plain conv + BatchNorm + ReLU stack (32-32-M-64-64-M-128-128-M), global pool, classifier."""

    config = (32, 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        layers: list[tuple[str, nn.Module]] = []
        channels, conv_index, pool_index = input_shape[0], 0, 0
        side = min(input_shape[1:])
        for item in self.config:
            if item == "M":
                if side >= 2:
                    pool_index += 1
                    layers.append((f"pool{pool_index}", nn.MaxPool2d(2)))
                    side //= 2
                continue
            conv_index += 1
            layers += [
                (f"conv{conv_index}", nn.Conv2d(channels, item, 3, padding=1, bias=False)),
                (f"bn{conv_index}", nn.BatchNorm2d(item)),
                (f"relu{conv_index}", nn.ReLU()),
            ]
            channels = item
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN; the residual add couples conv2's outputs with the shortcut's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)),
                ("bn", nn.BatchNorm2d(out_channels)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks, widths 16/32/64."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, channels = [], widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for block in range(3):
                stride = 2 if (stage > 0 and block == 0) else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_channels, hidden, 1, bias=False)), ("bn", nn.BatchNorm2d(hidden)), ("act", nn.ReLU6()),
        ]))
        self.depthwise = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)),
            ("bn", nn.BatchNorm2d(hidden)), ("act", nn.ReLU6()),
        ]))
        self.project = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(hidden, out_channels, 1, bias=False)), ("bn", nn.BatchNorm2d(out_channels)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """A narrow MobileNetV2 for 32x32 inputs: depthwise convs and inverted residual blocks."""

    # (expansion, out_channels, blocks, first stride)
    settings = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1))

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)), ("bn", nn.BatchNorm2d(16)), ("act", nn.ReLU6()),
        ]))
        blocks, channels = [], 16
        for expand, out_channels, repeats, stride in self.settings:
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expand))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(channels, 256, 1, bias=False)), ("bn", nn.BatchNorm2d(256)), ("act", nn.ReLU6()),
        ]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(out), 1))


class Conv1dNet(nn.Module):
    """1-D conv net for sequences such as mnist1d: three Conv1d + BN + ReLU stages, pool, classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv1d(input_shape[0], 32, 5, padding=2, bias=False)), ("bn1", nn.BatchNorm1d(32)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv1d(32, 64, 5, stride=2, padding=2, bias=False)), ("bn2", nn.BatchNorm1d(64)), ("relu2", nn.ReLU()),
            ("conv3", nn.Conv1d(64, 64, 3, stride=2, padding=1, bias=False)), ("bn3", nn.BatchNorm1d(64)), ("relu3", nn.ReLU()),
        ]))
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.fc1 = nn.Linear(flat, 128)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(x), 1)
        return self.classifier(torch.relu(self.fc1(out)))


@dataclass(frozen=True)
class ZooEntry:
    """One built-in architecture: how to build it, what it teaches, what input it takes."""

    name: str
    description: str
    factory: Callable[[tuple[int, ...], int], nn.Module]
    input_rank: int | None  # 3 = (C, H, W) images, 2 = (C, L) sequences, None = any
    default_dataset: str


ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in (
    ZooEntry("mlp", "Fully connected 256-128 MLP: neuron pruning on the simplest model.", mlp, None, "digits"),
    ZooEntry("lenet5", "LeNet-5: a small CNN with two conv layers and three fully connected layers.", LeNet5, 3, "digits"),
    ZooEntry("vgg_small", "VGG-style conv + BatchNorm stack: filter pruning without coupling.", VGGSmall, 3, "shapes"),
    ZooEntry("resnet20", "CIFAR ResNet-20: residual adds couple channels into groups.", ResNet20, 3, "shapes"),
    ZooEntry("mobilenetv2_small", "Small MobileNetV2: depthwise convs and inverted residuals, the hard case.",
             MobileNetV2Small, 3, "shapes"),
    ZooEntry("conv1d", "1-D conv net for sequences (mnist1d).", Conv1dNet, 2, "mnist1d"),
)}


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a fresh, randomly initialised zoo model for the given input shape and class count."""
    entry = ZOO.get(name)
    if entry is None:
        raise ExplorerError(f"Unknown zoo model '{name}'. Choose one of: {', '.join(ZOO)}.")
    input_shape = tuple(int(d) for d in input_shape)
    if entry.input_rank is not None and len(input_shape) != entry.input_rank:
        wanted = {3: "images (channels, height, width)", 2: "sequences (channels, length)"}[entry.input_rank]
        raise ExplorerError(
            f"'{name}' takes {wanted}, but the dataset gives inputs of shape {input_shape}. "
            f"Pick a dataset that matches (its usual one is '{entry.default_dataset}') or another model.")
    if num_classes < 2:
        raise ExplorerError(f"A classifier needs at least 2 classes; the dataset has {num_classes}.")
    return entry.factory(input_shape, num_classes)


# --------------------------------------------------------------------------- copying
def clone_model(model: nn.Module) -> nn.Module:
    """Deep copy a model, masked (torch.nn.utils.prune) models included.

    A masked module keeps its effective ``weight`` as a non-leaf tensor that ``copy.deepcopy``
    refuses; we hand deepcopy a detached stand-in (the pruning hook recomputes it on the next
    forward anyway) so the cached original stays untouched.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            names = [h._tensor_name for h in getattr(hook, "_pruning_methods", [hook])
                     if hasattr(h, "_tensor_name")]
            for tensor_name in names:
                current = module.__dict__.get(tensor_name)
                if isinstance(current, torch.Tensor) and not current.is_leaf:
                    memo[id(current)] = current.detach().clone()
    return copy.deepcopy(model, memo)


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


_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


def save_model(model: nn.Module, path: str | Path, *, arch: str, input_shape: tuple[int, ...],
               num_classes: int, metadata: dict | None = None) -> Path:
    """Save a (possibly pruned) model so `load_model` reads it back safely (``weights_only``).

    The file holds the effective weights (masks made permanent) plus each layer's channel
    counts, so a channel-pruned model is rebuilt from its architecture name (a zoo name or a
    ``module:callable`` factory) and reshaped before the weights go in: no pickled code.
    """
    model = clone_model(model)
    import torch.nn.utils.prune as prune_utils
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune_utils.BasePruningMethod):
                prune_utils.remove(module, hook._tensor_name)
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
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"Factory '{spec}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExplorerError(f"Factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module. "
                            "Make it return the model.")
    return model


def _build_arch(arch: str, input_shape, num_classes) -> nn.Module:
    if arch in ZOO:
        if input_shape is None or num_classes is None:
            raise ExplorerError(f"Building zoo model '{arch}' needs the input shape and class count "
                                "(pick a dataset).")
        return build(arch, input_shape, num_classes)
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
                return _from_saved(state, path, input_shape, num_classes)
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
                        "allow pickled models (trust_pickle=True / the 'trust this file' switch).") from exc
                return _load_pickled(path, data)
            raise ExplorerError(f"'{path.name}' is not a readable model file ({type(exc).__name__}). "
                                "It may be truncated or corrupt; save it again.") from exc
    if isinstance(state, nn.Module):
        return state
    if isinstance(state, dict) and state.get("format") == SAVE_FORMAT:
        return _from_saved(state, path, input_shape, num_classes)
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


def _from_saved(payload: dict, path: Path, input_shape, num_classes) -> nn.Module:
    shape = tuple(payload.get("input_shape") or input_shape or ())
    classes = payload.get("num_classes") or num_classes
    model = _build_arch(payload["arch"], shape, classes)
    _resize_to_state(model, payload["state_dict"], payload.get("attributes", {}))
    return load_state(model, payload["state_dict"], path.name)


def read_saved_metadata(path: str | Path) -> dict:
    """Architecture, input shape, class count and metadata of a file written by `save_model`."""
    path = Path(path)
    payload = _load_weights_file(path, _read_bytes(path))
    if not (isinstance(payload, dict) and payload.get("format") == SAVE_FORMAT):
        raise ExplorerError(f"'{path.name}' was not written by Pruning Explorer's save_model.")
    return {k: payload[k] for k in ("arch", "input_shape", "num_classes", "metadata")}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements), masked ones included."""
    return sum(p.numel() for p in model.parameters())
