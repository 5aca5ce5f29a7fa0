"""The multi-task topology's engine: a shared trunk and one head per task."""

from __future__ import annotations

import torch
from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.messages import Message
from sl_pipeline.models import multitask_heads
from workers.server.engines.base import VanillaEngine, run_segment


class MultitaskEngine(VanillaEngine):
    """One shared trunk, one head per task; each client names its task in ``meta.task``."""

    def __init__(self, trunk: nn.Module, in_features: int, cfg: ServerConfig) -> None:
        tasks, classes = cfg.server.tasks, cfg.server.task_classes
        if not tasks or len(tasks) != len(classes):
            raise ConfigError("multitask: server.tasks and server.task_classes must pair up")
        self.tasks = list(tasks)
        self.heads = nn.ModuleList(multitask_heads(cfg.model, in_features, classes))
        super().__init__(nn.ModuleDict({"trunk": trunk, "heads": self.heads}), cfg)
        self.trunk = trunk

    def _head(self, msg: Message) -> nn.Module:
        task = msg.meta.get("task")
        if task not in self.tasks:
            raise ProtocolError(f"unknown task {task!r}; this server trains {self.tasks}")
        return self.heads[self.tasks.index(str(task))]

    def outputs(self, msg: Message, act: torch.Tensor) -> torch.Tensor:
        return run_segment(self._head(msg), run_segment(self.trunk, act))
