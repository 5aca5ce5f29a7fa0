"""Round-robin split learning: several clients with horizontally partitioned data take turns
with one client segment, which travels between them sealed with a group secret that the
server relays but cannot read."""

from __future__ import annotations

from pathlib import Path

from sl_pipeline.config import ServerConfig
from sl_pipeline.models import build_segments
from workers.client.group import RoundRobinRunner
from workers.server.engines.base import Engine
from workers.server.engines.group import GroupEngine, TurnCoordinator, members
from workers.topologies.base import GroupTopology


class RoundRobin(GroupTopology):
    name = "roundrobin"
    runner = RoundRobinRunner
    group_secret = True

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        coordinator = TurnCoordinator(members(cfg), cfg.train.epochs)
        return GroupEngine(build_segments(cfg.model, self.name)[-1], cfg, coordinator)


TOPOLOGY = RoundRobin()
