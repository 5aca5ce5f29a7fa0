"""The server's engines, one module per engine: what the server computes for a topology,
without sockets (``handle(identity, message) -> replies``).

:func:`build_engine` is the factory: an engine's kind (what a topology names as its
``engine_kind`` in :mod:`workers.topologies`) -> a fresh engine for a server config. Engine
kinds are not topology names: several topologies share one engine (vanilla and multi-hop),
and one topology's engine differs from another's only by the coordinator it is given."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ConfigError
from sl_pipeline.models import Shape, build_segments, segment_inputs
from workers.server.aggregation import SecureAggregator
from workers.server.engines.base import Engine, VanillaEngine
from workers.server.engines.group import GroupEngine, TurnCoordinator, members
from workers.server.engines.middle import MiddleEngine
from workers.server.engines.multitask import MultitaskEngine
from workers.server.engines.vertical import VerticalEngine

EngineBuilder = Callable[[ServerConfig, Path], Engine]


def _segment(cfg: ServerConfig, index: int) -> tuple[nn.Module, Shape | None]:
    """The server's segment of the model (the last one, or the middle one: u-shaped) and
    the shape of one sample it takes, where the model config tells it."""
    segments = build_segments(cfg.model, cfg.server.topology)
    return segments[index], segment_inputs(segments, cfg.model.in_shape)[index]


def _vanilla(cfg: ServerConfig, base: Path) -> Engine:
    segment, shape = _segment(cfg, -1)
    return VanillaEngine(segment, cfg).expect(shape)


def _middle(cfg: ServerConfig, base: Path) -> Engine:
    segment, shape = _segment(cfg, 1)
    return MiddleEngine(segment, cfg).expect(shape)


def _fusion(cfg: ServerConfig, base: Path) -> Engine:
    return VerticalEngine(cfg, base)


def _multitask(cfg: ServerConfig, base: Path) -> Engine:
    trunk, shape = _segment(cfg, -1)
    if not isinstance(trunk, nn.Sequential) or not isinstance(trunk[-1], nn.Linear):
        raise ConfigError("multitask needs a Sequential model whose last layer is a Linear")
    return MultitaskEngine(trunk[:-1], trunk[-1].in_features, cfg).expect(shape)


def _turns(cfg: ServerConfig, base: Path) -> Engine:
    segment, shape = _segment(cfg, -1)
    turns = TurnCoordinator(members(cfg), cfg.train.epochs)
    return GroupEngine(segment, cfg, turns).expect(shape)


def _secure_aggregation(cfg: ServerConfig, base: Path) -> Engine:
    segment, shape = _segment(cfg, -1)
    clients = build_segments(cfg.model, cfg.server.topology)[0]  # what each member masks
    words = sum(p.numel() for p in clients.parameters())
    return GroupEngine(segment, cfg, SecureAggregator(members(cfg), words)).expect(shape)


ENGINES: dict[str, EngineBuilder] = {
    "vanilla": _vanilla,  # the rest of the model and the loss
    "middle": _middle,  # the middle segment; the client keeps head and labels (u-shaped)
    "fusion": _fusion,  # fuses the feature parties' cuts (vertical)
    "multitask": _multitask,  # a shared trunk, one head per task
    "turns": _turns,  # vanilla, plus the clients' turns with the sealed weights
    "secure_aggregation": _secure_aggregation,  # vanilla, plus masked averaging per round
}


def build_engine(kind: str, cfg: ServerConfig, base: Path) -> Engine:
    """A fresh engine of ``kind`` (a key of :data:`ENGINES`) for the server config ``cfg``."""
    builder = ENGINES.get(kind)
    if builder is None:
        raise ConfigError(f"engine {kind!r} is unknown; choose one of {list(ENGINES)}")
    return builder(cfg, base)


__all__ = ["ENGINES", "Engine", "build_engine"]
