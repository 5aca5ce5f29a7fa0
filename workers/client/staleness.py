"""Staleness compensation for a pipelined client: less explicit momentum the deeper it runs.

With ``d`` steps in flight, the gradient a client applies was computed ``d - 1`` of its own
updates ago (weight stashing makes it the exact gradient of those older weights, but it
lands late). Asynchronous SGD with staleness behaves like SGD with an added, implicit
momentum of about ``1 - 1/d`` ("Asynchrony begets momentum", Mitliagkas et al., 2016): each
gradient keeps pushing for ``d - 1`` steps after the weights it was taken at, as a momentum
buffer does. Stacked on the configured momentum (0.9 by default), the client's weights
overshoot and, at depth 8, diverged on one digits seed of four (docs/performance.md).
So, while ``d > 1`` steps are in flight, the client's SGD runs with the explicit momentum
reduced by the implicit part, ``max(0, momentum - (1 - 1/d))``, and gets the configured value
back when the pipelined run ends. Only the client's optimizer: the server applies every
step's gradient at once, on the weights that computed it, so its updates are not stale.
Off with ``train.staleness_compensation = false``; Adam has no such momentum and is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sl_pipeline.config import TrainConfig

log = logging.getLogger("workers.client")


def compensated_momentum(momentum: float, depth: int) -> float:
    """The explicit momentum that, with the implicit ``1 - 1/depth`` of ``depth - 1`` steps of
    staleness, adds up to ``momentum`` (never below 0)."""
    if depth <= 1:
        return momentum
    return max(0.0, momentum - (1.0 - 1.0 / depth))


class MomentumCompensation:
    """Sets the client optimizer's momentum for the depth in use; :meth:`restore` undoes it.

    The configured momentum comes from the config, never from the optimizer, so a state
    loaded mid-run (a rollback, a checkpoint) cannot make it compensate twice."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
        self.optimizer = optimizer
        self.momentum = train.momentum
        self.on = train.staleness_compensation and train.optimizer == "sgd"
        self.depth = 1

    def set_depth(self, depth: int) -> None:
        if not self.on or depth == self.depth:
            return
        value = compensated_momentum(self.momentum, depth)
        if depth > 1:
            log.info(
                "staleness compensation: client momentum %.3f at depth %d (configured %.3f)",
                value,
                depth,
                self.momentum,
            )
        self._set(value)
        self.depth = depth

    def restore(self) -> None:
        self.set_depth(1)

    def _set(self, value: float) -> None:
        _set_momentum(self.optimizer, value)


def configured_momentum(optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
    """Put the configured momentum back after loading a state: one saved while a pipelined
    run compensated (a checkpoint, an undo point) holds the lowered value, which a run at
    depth 1 would keep for good (a pipelined run compensates afresh from the config)."""
    if train.staleness_compensation and train.optimizer == "sgd":
        _set_momentum(optimizer, train.momentum)


def _set_momentum(optimizer: torch.optim.Optimizer, value: float) -> None:
    groups: list[dict[str, Any]] = optimizer.param_groups
    for group in groups:
        if "momentum" in group:
            group["momentum"] = value


__all__ = ["MomentumCompensation", "compensated_momentum", "configured_momentum"]
