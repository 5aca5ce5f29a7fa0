"""The server's engines, one per topology, and the factory that picks one from the config.

An engine computes without sockets: ``handle(identity, message) -> replies``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ConfigError
from sl_pipeline.models import build_segments
from workers.server.engines.base import Engine, MiddleEngine, MultitaskEngine, VanillaEngine
from workers.server.engines.group import GroupEngine
from workers.server.engines.vertical import VerticalEngine


def build_engine(cfg: ServerConfig, base: Path) -> Engine:
    topology = cfg.server.topology
    if topology == "vertical":
        return VerticalEngine(cfg, base)
    segments = build_segments(cfg.model, topology)
    if topology == "ushaped":
        return MiddleEngine(segments[1], cfg)
    if topology == "multitask":
        trunk = segments[-1]
        if not isinstance(trunk, nn.Sequential) or not isinstance(trunk[-1], nn.Linear):
            raise ConfigError("multitask needs a Sequential model whose last layer is a Linear")
        return MultitaskEngine(trunk[:-1], trunk[-1].in_features, cfg)
    if topology in ("roundrobin", "splitfed"):
        return GroupEngine(segments[-1], cfg)
    return VanillaEngine(segments[-1], cfg)
