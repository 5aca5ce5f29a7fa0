"""U-shaped split learning: two cuts; the client keeps the first layers, the last layers and
the labels, so neither the raw data nor the labels leave it (two exchanges per step)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sl_pipeline.topologies import default_cuts
from workers.topologies.base import Deployment, Topology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner


class UShaped(Topology):
    name = "ushaped"
    engine_kind = "middle"

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.runners import UShapedRunner

        return UShapedRunner

    def model_table(self, d: Deployment) -> dict[str, Any]:
        model = super().model_table(d)
        return {**model, "cuts": default_cuts(model["builtin"], self.name)}


TOPOLOGY = UShaped()
