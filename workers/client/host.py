"""The narrow view a step runner has of the client worker that drives it: the config
sections it reads (:class:`RunnerConfig`), and the worker's data, metrics and ``request``
(:class:`RunnerHost`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from privacy.config import PrivacyConfig
from sl_pipeline.config import ClientConfig, ClientSection, DataConfig, ModelConfig, TrainConfig
from sl_pipeline.data import PartyData
from sl_pipeline.messages import Kind, Message
from workers.ops.metrics import WorkerMetrics


@dataclass(frozen=True)
class RunnerConfig:
    """The sections of a client's config that a step runner reads: not the worker's own
    (its endpoint's limits, ops, checkpoints), which the worker and its link keep."""

    client: ClientSection  # its name, role, group and keys, where it saves its segment
    model: ModelConfig
    train: TrainConfig
    data: DataConfig  # the task of a multi-task client
    privacy: PrivacyConfig  # parsed once, here
    max_abs: float = 1e6  # limits.max_abs_value: the largest value a reply's tensor may hold

    @classmethod
    def of(cls, cfg: ClientConfig) -> RunnerConfig:
        privacy = PrivacyConfig.from_mapping(cfg.privacy) if cfg.privacy else PrivacyConfig()
        max_abs = cfg.limits.max_abs_value
        return cls(cfg.client, cfg.model, cfg.train, cfg.data, privacy, max_abs)


class RunnerHost(Protocol):
    """What a runner uses of the client worker that drives it."""

    base: Path
    topology: str
    data: PartyData
    metrics: WorkerMetrics
    epoch: int
    start: tuple[int, int]
    resumed_from: int

    async def request(self, message: Message, timeout_s: float | None = None) -> Message: ...

    def message(self, kind: Kind, step: int = 0, **kwargs: Any) -> Message: ...
