"""Server side of SplitFed's secure aggregation: it sees masked vectors and their sum only.

A round (one per epoch) runs in attempts. An attempt has two phases:

1. ``join``: every member sends a fresh random nonce. Once all members of the group (the
   configured names, each once; sub-names are never members) have joined, each gets the
   ``members`` announcement: the attempt's id and every member's nonce.
2. ``submit``: every member sends its masked fixed-point weights for that attempt. Once all
   have, each gets the ``sum`` (mod 2^64), in which the pairwise masks cancel.

A member that joins again with another nonce after the announcement (it restarted, or lost
the announcement) aborts the attempt: members that already submitted are told ``retry``
and join again with fresh nonces, so the next attempt's masks share nothing with this
one's. Nothing is ever unmasked for a missing member: a round's sum exists only when every
member submitted in the same attempt. Pure state: no sockets.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sl_pipeline.errors import CheckpointError, ProtocolError
from sl_pipeline.messages import Kind, Message, message_from_state, message_state
from sl_pipeline.secagg import NONCE_BYTES, masked_tensor, sum_masked

Reply = tuple[bytes, Message]
NOWHERE = b""  # the identity of a request restored from a checkpoint: no live connection
KEEP_SUMS = 2  # completed rounds whose sum a restarted member may still ask for
_NONCE = re.compile(rf"[0-9a-f]{{{2 * NONCE_BYTES}}}")


@dataclass
class _Attempt:
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    joined: dict[str, tuple[bytes, Message, str]] = field(default_factory=dict)
    announced: bool = False
    submitted: dict[str, tuple[bytes, Message, np.ndarray]] = field(default_factory=dict)


class SecureAggregator:
    """The rounds of one SplitFed group; ``version`` changes whenever a client-visible
    outcome (a sum, an abort) happens, which is when the server checkpoints."""

    def __init__(self, members: list[str], size: int | None = None) -> None:
        self.members = sorted(members)
        # Words in a masked vector: one per weight of the clients' segment (None: the first
        # submission's). Known, a member's vector of another size is that member's refusal;
        # taken from the first, one member submitting first made everyone else's refused.
        self.size = size
        self.open: dict[int, _Attempt] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.version = 0

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.client not in self.members:
            raise ProtocolError(
                f"splitfed: {msg.client!r} is not a member of this group {self.members}; "
                "a round counts each configured client once"
            )
        if msg.epoch in self.sums:  # done: a member that restarted gets the same sum
            return [(identity, self._sum_reply(msg))]
        if self.sums and msg.epoch < min(self.sums):
            raise ProtocolError(f"splitfed: round {msg.epoch} is over and forgotten")
        op = msg.meta.get("op")
        if op == "join":
            return self._join(identity, msg)
        if op == "submit":
            return self._submit(identity, msg)
        raise ProtocolError(f"splitfed: unexpected weights operation {op!r}")

    # ---- phase 1: nonces ------------------------------------------------------------------
    def _attempt(self, epoch: int) -> _Attempt:
        return self.open.setdefault(epoch, _Attempt())

    def _leave_other_rounds(self, member: str, epoch: int) -> list[Reply]:
        """A member is in one round at a time: joining ``epoch`` withdraws it from any other
        open round (an announced one starts over). So every member holds at most one open
        attempt, and no member can block the others' rounds by opening far-off ones."""
        replies: list[Reply] = []
        for other in [e for e, a in self.open.items() if e != epoch and member in a.joined]:
            attempt = self.open[other]
            if attempt.announced:
                replies += self._abort(other, attempt)
            else:
                del attempt.joined[member]
            if not self.open[other].joined:
                del self.open[other]
        return replies

    def _join(self, identity: bytes, msg: Message) -> list[Reply]:
        nonce = msg.meta.get("nonce")
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise ProtocolError(f"splitfed: a join carries a {NONCE_BYTES}-byte hex nonce")
        replies = self._leave_other_rounds(msg.client, msg.epoch)
        attempt = self._attempt(msg.epoch)
        if attempt.announced:
            previous = attempt.joined[msg.client]
            if previous[2] == nonce:  # the same join again: the same announcement
                return [(identity, self._announcement(attempt, previous[1]))]
            replies += self._abort(msg.epoch, attempt)
            attempt = self.open[msg.epoch]
        attempt.joined[msg.client] = (identity, msg, nonce)
        if len(attempt.joined) == len(self.members):
            attempt.announced = True
            replies += [(i, self._announcement(attempt, m)) for i, m, _ in attempt.joined.values()]
        return replies

    def _announcement(self, attempt: _Attempt, join: Message) -> Message:
        nonces = {name: nonce for name, (_, _, nonce) in attempt.joined.items()}
        return join.reply(
            Kind.WEIGHTS, meta={"op": "members", "attempt": attempt.id, "nonces": nonces}
        )

    def _abort(self, epoch: int, attempt: _Attempt) -> list[Reply]:
        """Start the round over with fresh nonces; no submission of this attempt is used."""
        self.open[epoch] = _Attempt()
        self.version += 1
        return [
            (i, m.reply(Kind.WEIGHTS, meta={"op": "retry"}))
            for i, m, _ in attempt.submitted.values()
        ]

    # ---- phase 2: masked vectors ----------------------------------------------------------
    def _submit(self, identity: bytes, msg: Message) -> list[Reply]:
        attempt = self.open.get(msg.epoch)
        if attempt is None or not attempt.announced or msg.meta.get("attempt") != attempt.id:
            return [(identity, msg.reply(Kind.WEIGHTS, meta={"op": "retry"}))]
        words = _masked_words(msg, attempt, self.size)
        earlier = attempt.submitted.get(msg.client)
        if earlier is not None:
            if not np.array_equal(earlier[2], words):
                raise ProtocolError(
                    f"splitfed: {msg.client} already submitted other weights in this attempt"
                )
            attempt.submitted[msg.client] = (identity, msg, words)
            return []
        attempt.submitted[msg.client] = (identity, msg, words)
        if len(attempt.submitted) < len(self.members):
            return []
        self.sums[msg.epoch] = masked_tensor(
            sum_masked([w for _, _, w in attempt.submitted.values()])
        )
        for old in sorted(self.sums)[:-KEEP_SUMS]:
            del self.sums[old]
        del self.open[msg.epoch]
        self.version += 1
        return [(i, self._sum_reply(m)) for i, m, _ in attempt.submitted.values()]

    def _sum_reply(self, msg: Message) -> Message:
        meta = {"op": "sum", "parties": len(self.members)}
        return msg.reply(Kind.WEIGHTS, meta=meta, tensors={"sum": self.sums[msg.epoch]})

    def queue_depth(self) -> int:
        return sum(len(a.submitted) if a.announced else len(a.joined) for a in self.open.values())

    # ---- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "members": list(self.members),
            "sums": dict(self.sums),
            "open": {epoch: _attempt_state(a) for epoch, a in self.open.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["members"]) != self.members:
            raise CheckpointError(
                f"the checkpoint's splitfed group {list(state['members'])} is not "
                f"server.group {self.members}; point checkpoint.dir elsewhere"
            )
        self.sums = {int(e): t for e, t in state["sums"].items()}
        self.open = {int(e): _attempt_from_state(a) for e, a in state["open"].items()}


def _masked_words(msg: Message, attempt: _Attempt, size: int | None = None) -> np.ndarray:
    masked = msg.tensor("masked")
    if masked.dtype != torch.int64 or masked.dim() != 1:
        raise ProtocolError("splitfed: masked weights must be a 1-D int64 tensor")
    if size is not None and masked.numel() != size:
        raise ProtocolError(
            f"splitfed: masked weights are {masked.numel()} words; the client segment of "
            f"this model has {size} words (one per weight): check the [model] section"
        )
    words = masked.numpy().view(np.uint64).copy()
    sizes = {w.size for _, _, w in attempt.submitted.values()}
    if sizes and sizes != {words.size}:
        raise ProtocolError("splitfed: clients sent weight vectors of different sizes")
    return words


def _attempt_state(attempt: _Attempt) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "announced": attempt.announced,
        "joined": {
            n: {"msg": message_state(m), "nonce": nonce}
            for n, (_, m, nonce) in attempt.joined.items()
        },
        "submitted": {n: message_state(m) for n, (_, m, _) in attempt.submitted.items()},
    }


def _attempt_from_state(state: dict[str, Any]) -> _Attempt:
    """Restored requests have no connection (NOWHERE): a reply to one is only cached, and
    the member's resent request is answered from the server's reply cache."""
    attempt = _Attempt(id=str(state["id"]), announced=bool(state["announced"]))
    for name, entry in state["joined"].items():
        attempt.joined[name] = (NOWHERE, message_from_state(entry["msg"]), str(entry["nonce"]))
    for name, entry in state["submitted"].items():
        msg = message_from_state(entry)
        attempt.submitted[name] = (NOWHERE, msg, _masked_words(msg, _Attempt()))
    return attempt
