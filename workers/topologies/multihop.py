"""Multi-hop split learning: client -> relay -> server, each holding one segment. The client
and the server run vanilla's step and engine; the relay (:mod:`workers.relay`) sits between."""

from __future__ import annotations

from typing import Any

from sl_pipeline.topologies import default_cuts
from workers.topologies.base import Deployment, Topology


class Multihop(Topology):
    name = "multihop"
    relays = 1

    def model_table(self, d: Deployment) -> dict[str, Any]:
        model = super().model_table(d)
        return {**model, "cuts": default_cuts(model["builtin"], self.name)}


TOPOLOGY = Multihop()
