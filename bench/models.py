"""Models the benchmarks use, as ``nn.Sequential`` so they split at an index.

``cifar_cnn`` is importable as ``model.sequential = "bench.models:cifar_cnn"`` by the real
workers. ``vgg16`` and ``resnet18`` are the VGG-style and ResNet-style models of the
FLOPs table (CIFAR-shaped 3x32x32 inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CIFAR_SHAPE = (3, 32, 32)
CIFAR_CNN_CUT = 3  # client: conv-relu-pool; cut activations are 32x16x16 per sample
VGG_CUT = 3  # client: the first conv-bn-relu (what the published SplitNN client ran)
RESNET_CUT = 3  # client: the stem conv-bn-relu
# The split-training benchmarks (overhead, rpc, scaling) all train these two models:
BATCH = 32
TRAIN = {"epochs": 1, "batch_size": BATCH, "lr": 0.01, "momentum": 0.9, "seed": 0}
MODELS: dict[str, dict[str, Any]] = {
    "digits_cnn": {"builtin": "cnn", "in_shape": [1, 8, 8], "classes": 10, "seed": 0},
    "cifar_cnn": {
        "sequential": "bench.models:cifar_cnn",
        "cuts": [CIFAR_CNN_CUT],
        "in_shape": [3, 32, 32],
        "classes": 10,
        "seed": 0,
    },
}
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def cifar_cnn(classes: int = 10) -> nn.Sequential:
    """A small CIFAR-shaped CNN: two conv blocks and two dense layers."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def vgg16(classes: int = 10) -> nn.Sequential:
    """VGG-16 with batch norm, CIFAR variant (one 512->classes classifier)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(item, int)
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
        channels = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, classes))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a (projected when needed) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Sequential:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), as a flat Sequential of blocks."""
    blocks: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))
