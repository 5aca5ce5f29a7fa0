"""Round-robin split learning: several clients with horizontally partitioned data take turns
with one client segment, which travels between them sealed with a group secret that the
server relays but cannot read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.topologies.base import GroupTopology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner


class RoundRobin(GroupTopology):
    name = "roundrobin"
    engine_kind = "turns"
    group_secret = True

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.group import RoundRobinRunner

        return RoundRobinRunner


TOPOLOGY = RoundRobin()
