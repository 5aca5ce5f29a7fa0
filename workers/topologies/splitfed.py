"""SplitFed: several clients train their own copies of the client segment in parallel and
average them each round by secure aggregation (the server sees masked vectors and their sum
only; pairwise masks come from the clients' own keys)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sl_pipeline.config import ServerConfig
from workers.topologies.base import GroupTopology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner
    from workers.server.engines.base import Engine


class SplitFed(GroupTopology):
    name = "splitfed"
    pairwise_keys = True

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.group import SplitFedRunner

        return SplitFedRunner

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        from sl_pipeline.models import build_segments
        from workers.server.aggregation import SecureAggregator
        from workers.server.engines.group import GroupEngine, members

        coordinator = SecureAggregator(members(cfg))
        return GroupEngine(build_segments(cfg.model, self.name)[-1], cfg, coordinator)


TOPOLOGY = SplitFed()
