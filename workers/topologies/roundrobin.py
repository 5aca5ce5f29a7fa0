"""Round-robin split learning: several clients with horizontally partitioned data take turns
with one client segment, which travels between them sealed with a group secret that the
server relays but cannot read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sl_pipeline.config import ServerConfig
from workers.topologies.base import GroupTopology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner
    from workers.server.engines.base import Engine


class RoundRobin(GroupTopology):
    name = "roundrobin"
    group_secret = True

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.group import RoundRobinRunner

        return RoundRobinRunner

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        from sl_pipeline.models import build_segments
        from workers.server.engines.group import GroupEngine, TurnCoordinator, members

        coordinator = TurnCoordinator(members(cfg), cfg.train.epochs)
        return GroupEngine(build_segments(cfg.model, self.name)[-1], cfg, coordinator)


TOPOLOGY = RoundRobin()
