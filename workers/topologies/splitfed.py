"""SplitFed: several clients train their own copies of the client segment in parallel and
average them each round by secure aggregation (the server sees masked vectors and their sum
only; pairwise masks come from the clients' own keys)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.topologies.base import GroupTopology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner


class SplitFed(GroupTopology):
    name = "splitfed"
    engine_kind = "secure_aggregation"
    min_clients = 2  # pairwise masks need a pair: one client's sum would be its own weights
    pairwise_keys = True

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.group import SplitFedRunner

        return SplitFedRunner


TOPOLOGY = SplitFed()
