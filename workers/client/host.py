"""The narrow view a step runner has of the client worker that drives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from sl_pipeline.config import ClientConfig
from sl_pipeline.data import PartyData
from sl_pipeline.messages import Kind, Message
from workers.ops.metrics import WorkerMetrics


class RunnerHost(Protocol):
    """What a runner uses of the client worker that drives it."""

    cfg: ClientConfig
    base: Path
    topology: str
    data: PartyData
    metrics: WorkerMetrics
    epoch: int
    start: tuple[int, int]
    resumed_from: int

    async def request(self, message: Message, timeout_s: float | None = None) -> Message: ...

    def message(self, kind: Kind, step: int = 0, **kwargs: Any) -> Message: ...
