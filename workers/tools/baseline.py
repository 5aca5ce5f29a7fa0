"""The centralised baseline: the same architecture trained in one process on pooled data.

`sl-pipeline demo --baseline` reports it beside the split run's accuracy, so a user sees
what splitting the network (and any privacy defense) costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sl_pipeline.config import DataConfig, ModelConfig
from sl_pipeline.data import batch_order, load_party_data
from sl_pipeline.models import (
    build_segments,
    full_model,
    make_optimizer,
    multitask_heads,
    vertical_bottom,
    vertical_top,
)
from workers.topologies import topology as find_topology
from workers.topologies.base import DATASETS, feature_slices

LR, MOMENTUM, BATCH = 0.05, 0.9, 32


class _Vertical(nn.Module):
    def __init__(
        self, bottoms: Sequence[nn.Module], top: nn.Module, slices: list[list[int]]
    ) -> None:
        super().__init__()
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.slices = slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1)
        parts = [b(flat[:, a:z]) for b, (a, z) in zip(self.bottoms, self.slices, strict=True)]
        return self.top(torch.cat(parts, dim=1))  # type: ignore[no-any-return]


def _train_and_test(
    model: nn.Module, data_cfg: DataConfig, classes: int, epochs: int, seed: int
) -> float:
    # One torch thread, as every worker runs (train.threads = 1): the same reduction order,
    # so the baseline is comparable bit for bit and repeats exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_score(model, data_cfg, classes, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_and_score(
    model: nn.Module, data_cfg: DataConfig, classes: int, epochs: int, seed: int
) -> float:
    data = load_party_data(data_cfg, Path("."), classes)
    assert data.train.y is not None and data.test.y is not None
    opt = make_optimizer(list(model.parameters()), "sgd", LR, MOMENTUM)
    for epoch in range(epochs):
        for idx in batch_order(len(data.train), BATCH, seed, epoch):
            opt.zero_grad()
            F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = (model(data.test.x).argmax(1) == data.test.y).sum()
    return float(correct) / len(data.test)


def central_accuracy(
    dataset: str, topology: str, epochs: int, seed: int = 0, clients: int = 1
) -> float:
    known = DATASETS[dataset]
    cfg = ModelConfig(
        builtin=str(known["builtin"]),
        in_shape=list(known["in_shape"]),
        classes=int(known["classes"]),
        seed=seed,
    )
    data_cfg = DataConfig(dataset=dataset, seed=seed)
    spec = find_topology(topology)
    if spec.feature_parties:
        slices = feature_slices(dataset, clients)
        bottoms = [
            vertical_bottom(
                ModelConfig(builtin="mlp", in_shape=[z - a], classes=cfg.classes, seed=seed), i
            )
            for i, (a, z) in enumerate(slices)
        ]
        top = vertical_top(
            ModelConfig(builtin="mlp", classes=cfg.classes, seed=seed), clients, "concat"
        )
        return _train_and_test(_Vertical(bottoms, top, slices), data_cfg, cfg.classes, epochs, seed)
    if spec.tasks is not None:
        accuracies = []
        classes = spec.tasks["task_classes"]
        for i, (task, n) in enumerate(zip(spec.tasks["tasks"], classes, strict=True)):
            bottom, rest = build_segments(cfg, spec.name)
            assert isinstance(rest, nn.Sequential)
            head = multitask_heads(cfg, rest[-1].in_features, classes)[i]  # type: ignore[arg-type]
            model = nn.Sequential(bottom, rest[:-1], head)
            task_cfg = DataConfig(dataset=dataset, seed=seed, task=str(task))
            accuracies.append(_train_and_test(model, task_cfg, int(n), epochs, seed))
        return sum(accuracies) / len(accuracies)
    return _train_and_test(full_model(cfg), data_cfg, cfg.classes, epochs, seed)
