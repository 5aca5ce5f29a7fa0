"""Multi-task split learning: one shared trunk at the server, one head per task; each client
trains one task (its config names it) on the same kind of input."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ConfigError
from workers.topologies.base import Deployment, Table, Topology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner
    from workers.server.engines.base import Engine


# The tasks of a generated deployment: the digit itself, and whether it is odd.
TASKS: dict[str, Any] = {"tasks": ["digit", "parity"], "task_classes": [10, 2]}


class Multitask(Topology):
    name = "multitask"
    default_clients = min_clients = 2
    datasets = ("digits",)
    datasets_note = " (tasks: digit, parity)"
    tasks = TASKS

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.runners import MultitaskRunner

        return MultitaskRunner

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        from torch import nn

        from sl_pipeline.models import build_segments
        from workers.server.engines.multitask import MultitaskEngine

        trunk = build_segments(cfg.model, self.name)[-1]
        if not isinstance(trunk, nn.Sequential) or not isinstance(trunk[-1], nn.Linear):
            raise ConfigError("multitask needs a Sequential model whose last layer is a Linear")
        return MultitaskEngine(trunk[:-1], trunk[-1].in_features, cfg)

    def client_tables(self, i: int, d: Deployment, tables: Table) -> None:
        tables["data"]["task"] = TASKS["tasks"][i % len(TASKS["tasks"])]

    def server_tables(self, d: Deployment, tables: Table) -> None:
        tables["server"].update(TASKS)


TOPOLOGY = Multitask()
