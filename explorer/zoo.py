"""The built-in architectures: one per pruning concept, each sized by the dataset.

An MLP (neurons), LeNet-5 (a small CNN), a plain VGG-style conv + BatchNorm stack (filters
without coupling), ResNet-20 (residual adds couple channels into groups), a small MobileNetV2
(depthwise convs and inverted residuals: the hard case), a 1-D conv net for mnist1d and a
small vision transformer (``nn.MultiheadAttention`` heads). Every
factory takes the dataset's input shape and class count, so the same name works on digits,
mnist1d or synthetic images. `ZOO` is the registry the UI, the CLI and recipes share.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from explorer.errors import ExplorerError

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


class ViTSmall(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021): patches, a class token, ``nn.TransformerEncoder``.

    A strided conv cuts the image into patches (8 x 8 of them on 32 x 32 shapes), a learned class
    token and position embeddings join them, two pre-norm encoder layers of 4 heads attend over
    them, and the class token's output is classified. Its attention is ``nn.MultiheadAttention``
    (a fused query-key-value projection), the layer most user transformers are built from.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64, heads: int = 4,
                 depth: int = 2, mlp_width: int = 128):
        super().__init__()
        channels, side = input_shape[0], min(input_shape[1:])
        patch = max(1, side // 8)
        self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch)
        tokens = (input_shape[1] // patch) * (input_shape[2] // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, mlp_width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens))[:, 0])


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
    ZooEntry("vit_small", "Small vision transformer: nn.MultiheadAttention heads, pruned whole.", ViTSmall, 3, "shapes"),
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
