"""Many clients, one server, horizontally partitioned data: round-robin and SplitFed.

The server trains its segment exactly as in vanilla; in addition it coordinates the clients'
own segments through WEIGHTS messages whose payload it cannot read. The members of the
group are exactly ``server.group``, each under its own (admitted) name: a sub-name is
never a member.

* ``roundrobin``: clients take turns, one epoch each per round, in name order. The client
  whose turn ends hands its segment's weights to the next one, sealed with the clients'
  group key and bound to the run and the turn (:mod:`sl_pipeline.group`): the server only
  stores and forwards the ciphertext.
* ``splitfed``: clients train in parallel; after each round their segments are averaged by
  secure aggregation (:mod:`workers.server.aggregation`, :mod:`sl_pipeline.secagg`): the server
  learns the sum and nothing else.

Both coordinators' state goes into the server's checkpoint, and ``coordination_version``
changes whenever a client saw it change, so the server checkpoints before that reply leaves.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch
from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import CheckpointError, ConfigError, ProtocolError
from sl_pipeline.messages import Kind, Message, message_from_state, message_state
from workers.server.aggregation import NOWHERE
from workers.server.engines.base import Reply, VanillaEngine

_RUN_NONCE = re.compile(r"[0-9a-f]{64}")


class Coordinator(Protocol):
    version: int

    def handle(self, identity: bytes, msg: Message) -> list[Reply]: ...
    def queue_depth(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TurnCoordinator:
    """Round-robin turns: who holds the client segment now, and its sealed weights."""

    def __init__(self, members: list[str], epochs: int) -> None:
        self.order = sorted(members)
        self.epochs = epochs
        self.turn = 0  # turns completed so far
        self.blob: torch.Tensor | None = None  # sealed weights of the last turn
        self.run_nonces: dict[str, str] = {}  # each member's nonce for this run
        self.waiting: dict[str, tuple[bytes, Message]] = {}
        self.version = 0

    def _whose_turn(self) -> str | None:
        if len(self.run_nonces) < len(self.order):
            return None  # every member must have joined the run before the first grant
        return self.order[self.turn % len(self.order)]

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.client not in self.order:
            raise ProtocolError(
                f"roundrobin: {msg.client!r} is not a member of this group {self.order}"
            )
        op = msg.meta.get("op")
        if op == "release":
            if self._whose_turn() != msg.client:
                raise ProtocolError("roundrobin: released weights outside your turn")
            sealed = msg.tensor("sealed")
            if sealed.dtype != torch.uint8 or sealed.dim() != 1:
                raise ProtocolError("roundrobin: sealed weights must be a 1-D uint8 tensor")
            self.blob = sealed.clone()
            self.turn += 1
            self.version += 1
            replies: list[Reply] = [(identity, msg.reply(Kind.WEIGHTS, meta={"op": "ack"}))]
        elif op == "acquire":
            self._join_run(msg)
            self.waiting[msg.client] = (identity, msg)
            replies = []
        else:
            raise ProtocolError(f"roundrobin: unexpected weights operation {op!r}")
        return replies + self._grant()

    def _join_run(self, msg: Message) -> None:
        nonce = msg.meta.get("run")
        if not isinstance(nonce, str) or not _RUN_NONCE.fullmatch(nonce):
            raise ProtocolError("roundrobin: an acquire carries the client's 32-byte run nonce")
        known = self.run_nonces.get(msg.client)
        if known is None:
            self.run_nonces[msg.client] = nonce
            self.version += 1
        elif known != nonce:
            raise ProtocolError(
                f"roundrobin: {msg.client} started another run while this one is at turn "
                f"{self.turn}; resume it from its checkpoint, or restart the whole group"
            )

    def _grant(self) -> list[Reply]:
        """Answer the waiting client whose turn it is, or everyone once all turns are done."""
        final = self.turn >= len(self.order) * self.epochs
        replies = []
        for name, (identity, msg) in list(self.waiting.items()):
            if self._whose_turn() is None:
                break
            if final or (name == self._whose_turn() and not msg.meta.get("final")):
                tensors = {"sealed": self.blob} if self.blob is not None else {}
                meta = {"op": "grant", "turn": self.turn, "run": dict(self.run_nonces)}
                replies.append((identity, msg.reply(Kind.WEIGHTS, meta=meta, tensors=tensors)))
                del self.waiting[name]
        return replies

    def queue_depth(self) -> int:
        return len(self.waiting)

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": list(self.order),
            "turn": self.turn,
            "blob": self.blob,
            "run_nonces": dict(self.run_nonces),
            "waiting": {name: message_state(msg) for name, (_, msg) in self.waiting.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["order"]) != self.order:
            raise CheckpointError(
                f"the checkpoint's roundrobin group {list(state['order'])} is not "
                f"server.group {self.order}; point checkpoint.dir elsewhere"
            )
        self.turn = int(state["turn"])
        self.blob = state["blob"]
        self.run_nonces = {str(k): str(v) for k, v in state["run_nonces"].items()}
        # A ZeroMQ identity means nothing to the restarted server (it may even be reused
        # for another connection): a grant for a restored entry goes nowhere but into the
        # reply cache, which answers the client's resent acquire.
        self.waiting = {
            name: (NOWHERE, message_from_state(msg)) for name, msg in state["waiting"].items()
        }


def members(cfg: ServerConfig) -> list[str]:
    s = cfg.server
    if len(s.group) < 1 or len(set(s.group)) != len(s.group) or any("/" in n for n in s.group):
        raise ConfigError(
            f"{s.topology}: set server.group to the clients' names, each once "
            "(the members of every round; `sl-pipeline init` writes it)"
        )
    if s.parties not in (1, len(s.group)):
        raise ConfigError(
            f"{s.topology}: server.parties = {s.parties} but server.group lists "
            f"{len(s.group)} clients; drop server.parties or make them agree"
        )
    return list(s.group)


class GroupEngine(VanillaEngine):
    """Vanilla's steps, plus the rounds in which the clients hand over their segment's
    weights: turns (round-robin) or secure aggregation (SplitFed), as ``coordinator`` says."""

    def __init__(self, module: nn.Module, cfg: ServerConfig, coordinator: Coordinator) -> None:
        super().__init__(module, cfg)
        self.coordinator = coordinator

    @property
    def coordination_version(self) -> int:
        return self.coordinator.version

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.kind is not Kind.WEIGHTS:
            return super().handle(identity, msg)
        return self.coordinator.handle(identity, msg)

    def queue_depth(self) -> int:
        return self.coordinator.queue_depth()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "group": self.coordinator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "group" in state:
            self.coordinator.load_state_dict(state["group"])
