"""U-shaped split learning: two cuts; the client keeps the first layers, the last layers and
the labels, so neither the raw data nor the labels leave it (two exchanges per step)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sl_pipeline.config import ServerConfig
from sl_pipeline.topologies import default_cuts
from workers.topologies.base import Deployment, Topology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner
    from workers.server.engines.base import Engine


class UShaped(Topology):
    name = "ushaped"

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.runners import UShapedRunner

        return UShapedRunner

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        from sl_pipeline.models import build_segments
        from workers.server.engines.middle import MiddleEngine

        return MiddleEngine(build_segments(cfg.model, self.name)[1], cfg)

    def model_table(self, d: Deployment) -> dict[str, Any]:
        model = super().model_table(d)
        return {**model, "cuts": default_cuts(model["builtin"], self.name)}


TOPOLOGY = UShaped()
