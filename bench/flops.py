"""Client compute and communication: split learning vs federated averaging, per epoch.

Reproduces the shape of the project page's Tables 1 and 2 with our own counts: FLOPs from
``torch.utils.flop_counter.FlopCounterMode`` on one batch (shapes only, on the meta device,
so nothing is computed), scaled by the samples each client holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import CIFAR_SHAPE, RESNET_CUT, VGG_CUT, resnet18, vgg16

TRAIN_IMAGES = 50_000
CLIENT_COUNTS = (100, 500)
COUNT_BATCH = 4
FLOAT_BYTES = 4
LABEL_BYTES = 8  # int64 labels travel with the activations in the vanilla topology
GB = 1e9
TFLOP = 1e12

# What the project page's image shows (results-table.png), transcribed as printed.
PUBLISHED = {
    "table1_client_tflops": {
        "setup": "CIFAR-10 over VGG, whole training (epochs not stated), per client",
        "large_scale_sgd": {"100": 29.4, "500": 5.89},
        "federated": {"100": 29.4, "500": 5.89},
        "splitnn": {"100": 0.1548, "500": 0.03},
    },
    "table2_client_gb": {
        "setup": "CIFAR-100 over ResNet-50, whole training (epochs not stated), per client",
        "large_scale_sgd": {"100": 13.0, "500": 14.0},
        "federated": {"100": 3.0, "500": 2.4},
        "splitnn": {"100": 6.0, "500": 1.2},
    },
}

ASSUMPTIONS = [
    f"{TRAIN_IMAGES} CIFAR-10-shaped training images (3x32x32) split evenly; figures are per "
    "client per epoch (one pass over its share)",
    "FLOPs = FlopCounterMode count (2 per multiply-add) of forward+backward on one batch, "
    "per sample x samples per client; weight update, loss and data loading not counted",
    "federated: every client trains the whole model on its share and, once per epoch, "
    "downloads and uploads the whole float32 model",
    "split: the client trains its segment only; per sample it sends float32 cut activations "
    "and int64 labels and receives the float32 gradient at the cut; plus once per epoch it "
    "receives and passes on its segment's weights (round-robin hand-off)",
    "cuts: VGG-16-BN after the first conv-bn-relu, ResNet-18 after the stem conv-bn-relu; "
    "the published tables used VGG and ResNet-50/CIFAR-100 over an unstated number of "
    "epochs, so compare the split/federated ratios, not absolute values",
]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_flops_per_sample(model: nn.Module, cut: int | None) -> tuple[float, tuple[int, ...]]:
    """Forward+backward FLOPs per sample of ``model[:cut]`` (whole model if ``cut`` is None).

    Returns the FLOPs and the per-sample output shape of the counted part.
    """
    part = model if cut is None else model[:cut]  # type: ignore[index]
    part = part.to("meta")
    x = torch.empty((COUNT_BATCH, *CIFAR_SHAPE), device="meta")
    with FlopCounterMode(display=False) as counter:
        out = part(x)
        if cut is None:
            labels = torch.zeros(COUNT_BATCH, dtype=torch.long, device="meta")
            F.cross_entropy(out, labels).backward()
        else:
            out.backward(torch.empty_like(out))
    return counter.get_total_flops() / COUNT_BATCH, tuple(out.shape[1:])


def counts(factory: Callable[[], nn.Sequential], cut: int) -> dict[str, Any]:
    """Per-sample training FLOPs (whole model, client segment), parameters, cut shape."""
    model = factory()
    full, _ = train_flops_per_sample(model, None)
    segment, cut_shape = train_flops_per_sample(factory(), cut)
    return {
        "full": full,
        "segment": segment,
        "cut_shape": cut_shape,
        "params": _numel(model),
        "client_params": _numel(model[:cut]),
    }


def per_client(c: dict[str, Any], clients: int) -> dict[str, Any]:
    """Per-client, per-epoch TFLOPs and GB for federated averaging and split learning."""
    samples = TRAIN_IMAGES / clients
    act_bytes = math.prod(c["cut_shape"]) * FLOAT_BYTES
    split_bytes = samples * (2 * act_bytes + LABEL_BYTES) + 2 * c["client_params"] * FLOAT_BYTES
    fl_tflops, split_tflops = c["full"] * samples / TFLOP, c["segment"] * samples / TFLOP
    return {
        "federated_tflops": fl_tflops,
        "split_tflops": split_tflops,
        "compute_ratio_fl_over_split": fl_tflops / split_tflops,
        "federated_gb": 2 * c["params"] * FLOAT_BYTES / GB,
        "split_gb": split_bytes / GB,
        "params": c["params"],
        "client_params": c["client_params"],
        "cut_shape": list(c["cut_shape"]),
    }


MODELS: dict[str, tuple[Callable[[], nn.Sequential], int]] = {
    "vgg16": (vgg16, VGG_CUT),
    "resnet18": (resnet18, RESNET_CUT),
}


def run(quick: bool = False) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, (factory, cut) in MODELS.items():
        c = counts(factory, cut)
        table[name] = {str(k): per_client(c, k) for k in CLIENT_COUNTS}
    return {
        "flops_table": {"ours_per_epoch": table, "published": PUBLISHED, "assumptions": ASSUMPTIONS}
    }
