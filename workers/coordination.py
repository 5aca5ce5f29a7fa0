"""Many clients, one server, horizontally partitioned data: round-robin and SplitFed.

The server trains its segment exactly as in vanilla; in addition it coordinates the clients'
own segments through WEIGHTS messages whose payload it cannot read:

* ``roundrobin``: clients take turns, one epoch each per round, in name order. The client
  whose turn ends hands its segment's weights to the next one, sealed with the clients'
  group key (AES-256-GCM): the server only stores and forwards the ciphertext.
* ``splitfed``: clients train in parallel; at the end of each round each sends its segment's
  weights masked with pairwise masks that cancel in the sum (secure aggregation over
  fixed-point integers mod 2^64). The server adds the masked vectors and returns the sum,
  from which each client takes the average: the server learns only the average.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.messages import Kind, Message

from .engine import Reply, VanillaEngine


class GroupEngine(VanillaEngine):
    def __init__(self, module: nn.Module, cfg: ServerConfig) -> None:
        super().__init__(module, cfg)
        if cfg.server.parties < 1:
            raise ConfigError(f"{cfg.server.topology}: server.parties must be the client count")
        self.parties = cfg.server.parties
        self.mode = cfg.server.topology
        self.turn = 0  # roundrobin: turns completed so far
        self.blob: torch.Tensor | None = None  # roundrobin: sealed weights of the last turn
        self.order: list[str] = []
        self._waiting: dict[str, tuple[bytes, Message]] = {}
        self._rounds: dict[int, dict[str, tuple[bytes, Message, np.ndarray]]] = {}

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.kind is not Kind.WEIGHTS:
            return super().handle(identity, msg)
        op = msg.meta.get("op")
        if self.mode == "roundrobin" and op in ("acquire", "release"):
            return self._roundrobin(identity, msg, str(op))
        if self.mode == "splitfed" and op == "average":
            return self._average(identity, msg)
        raise ProtocolError(f"{self.mode}: unexpected weights operation {op!r}")

    # ---- round-robin ---------------------------------------------------------------------
    def _whose_turn(self) -> str | None:
        if len(self.order) < self.parties:
            return None
        return self.order[self.turn % self.parties]

    def _roundrobin(self, identity: bytes, msg: Message, op: str) -> list[Reply]:
        if msg.client not in self.order:
            if len(self.order) >= self.parties:
                raise ProtocolError(f"roundrobin: already {self.parties} clients in this group")
            self.order = sorted([*self.order, msg.client])
        if op == "release":
            if self._whose_turn() != msg.client:
                raise ProtocolError("roundrobin: released weights outside your turn")
            self.blob = msg.tensor("sealed").clone()
            self.turn += 1
            replies: list[Reply] = [(identity, msg.reply(Kind.WEIGHTS, meta={"op": "ack"}))]
        else:
            self._waiting[msg.client] = (identity, msg)
            replies = []
        return replies + self._grant()

    def _grant(self) -> list[Reply]:
        """Answer the waiting client whose turn it is, or everyone once all turns are done."""
        final = self.turn >= self.parties * self.cfg.train.epochs
        replies = []
        for name, (identity, msg) in list(self._waiting.items()):
            if final or (name == self._whose_turn() and not msg.meta.get("final")):
                tensors = {"sealed": self.blob} if self.blob is not None else {}
                replies.append(
                    (
                        identity,
                        msg.reply(
                            Kind.WEIGHTS, meta={"op": "grant", "turn": self.turn}, tensors=tensors
                        ),
                    )
                )
                del self._waiting[name]
        return replies

    # ---- SplitFed secure averaging -------------------------------------------------------
    def _average(self, identity: bytes, msg: Message) -> list[Reply]:
        masked = msg.tensor("masked")
        if masked.dtype != torch.int64 or masked.dim() != 1:
            raise ProtocolError("splitfed: masked weights must be a 1-D int64 tensor")
        round_parts = self._rounds.setdefault(msg.epoch, {})
        round_parts[msg.client] = (identity, msg, masked.numpy().view(np.uint64).copy())
        if len(round_parts) < self.parties:
            return []
        del self._rounds[msg.epoch]
        vectors = [v for _, _, v in round_parts.values()]
        if any(v.shape != vectors[0].shape for v in vectors):
            raise ProtocolError("splitfed: clients sent weight vectors of different sizes")
        total = np.zeros_like(vectors[0])
        for vector in vectors:
            total += vector  # uint64 arithmetic wraps mod 2^64: the masks cancel exactly
        summed = torch.from_numpy(total.view(np.int64).copy())
        return [
            (
                ident,
                m.reply(
                    Kind.WEIGHTS,
                    meta={"op": "sum", "parties": self.parties},
                    tensors={"sum": summed},
                ),
            )
            for ident, m, _ in round_parts.values()
        ]

    def queue_depth(self) -> int:
        return len(self._waiting) + sum(len(parts) for parts in self._rounds.values())

    def forget(self, client: str) -> None:
        self._waiting.pop(client, None)
