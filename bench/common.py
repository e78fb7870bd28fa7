"""What the benchmarks share: the machine's CPU name and an ImageNet ResNet-18 layout."""
from __future__ import annotations

import platform

import torch
from torch import nn

from explorer.zoo import BasicBlock


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows), for the results files."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class ResNet18(nn.Module):
    """The ImageNet ResNet-18 layout (11.69 M parameters): 7x7 stem, max-pool, 4 stages of 2
    basic blocks — written out from the zoo's BasicBlock so torchvision is not needed."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mlp_25m(input_shape=(1, 8, 8), num_classes: int = 10) -> nn.Module:
    """A plain MLP of about 25 M parameters on small inputs: big weights, cheap forward.

    A factory (``bench.common:mlp_25m``) for loading into the app, so the slider benchmark can show
    that a slider move does not scale with the model (the scores are sorted once).
    """
    features = 1
    for size in input_shape:
        features *= int(size)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, num_classes))
