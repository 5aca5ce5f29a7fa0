"""SplitFed: several clients train their own copies of the client segment in parallel and
average them each round by secure aggregation (the server sees masked vectors and their sum
only; pairwise masks come from the clients' own keys)."""

from __future__ import annotations

from pathlib import Path

from sl_pipeline.config import ServerConfig
from sl_pipeline.models import build_segments
from workers.client.group import SplitFedRunner
from workers.server.aggregation import SecureAggregator
from workers.server.engines.base import Engine
from workers.server.engines.group import GroupEngine, members
from workers.topologies.base import GroupTopology


class SplitFed(GroupTopology):
    name = "splitfed"
    runner = SplitFedRunner
    pairwise_keys = True

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        coordinator = SecureAggregator(members(cfg))
        return GroupEngine(build_segments(cfg.model, self.name)[-1], cfg, coordinator)


TOPOLOGY = SplitFed()
