"""Who may join a listening worker, and who is in: the admission and peer-table rules.

Pure code over peer identities (the ROUTER socket's bytes) and clocks passed in: no socket,
no logging, no metrics. :class:`workers.runtime.service.RouterService` drives it from its
asyncio loop and does the I/O around each decision; a test drives it with bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sl_pipeline.ciphers import DEFAULT_CIPHERS
from sl_pipeline.errors import (
    CryptoError,
    LimitError,
    NotAdmittedError,
    OverloadedError,
    ProtocolError,
    ReplayError,
    SLError,
    VersionError,
)
from sl_pipeline.messages import MAX_ID_CHARS, Message
from sl_pipeline.transport import Channel

CONFIRM_TIMEOUT_S = 30.0  # a session must send its first message within this after joining
PENDING_PER_NAME = 2  # unconfirmed sessions kept per name (a client retrying its join)
MAX_NAME_CHARS = 64


@dataclass(frozen=True)
class Listen:
    """Where and how a service listens; the config keys are named for error messages."""

    bind: str
    key: str
    admitted: str
    insecure: bool
    max_peers: int
    peer_timeout_s: float
    section: str  # "server" or "relay"
    relays: frozenset[str] = frozenset()  # admitted names that may speak for others
    hellos_per_s: float = 20.0  # per source address, after a burst of hello_burst
    hello_burst: int = 100
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS  # transport suites accepted, preferred first


@dataclass
class Peer:
    name: str
    channel: Channel
    key: str  # fingerprint of the static key, or "insecure"
    last_seen: float = field(default_factory=time.monotonic)
    applied: int = 0
    confirmed: bool = False  # set once the peer's first sealed message opens
    partial_bytes: int = 0  # parts of a chunked message received so far
    partial_since: float | None = None  # when that message's first part arrived

    def partial(self, nbytes: int, now: float) -> None:
        """A part of a chunked message arrived (``nbytes`` of it)."""
        if self.partial_since is None:
            self.partial_since = now
        self.partial_bytes += nbytes

    def whole(self) -> int:
        """The chunked message is complete or refused: the bytes its parts held."""
        held, self.partial_bytes, self.partial_since = self.partial_bytes, 0, None
        return held


class PeerTable:
    """The sessions of one listening worker, keyed by socket identity."""

    def __init__(
        self,
        listen: Listen,
        role: str,
        fingerprint: str,
        admitted_names: dict[bytes, str],
        on_bound: Callable[[str], None] = lambda table: None,
    ) -> None:
        self.listen = listen
        self.role = role
        self.fingerprint = fingerprint  # of the model and topology: both sides must agree
        self.admitted_names = admitted_names  # static public key -> name
        self.on_bound = on_bound
        self.peers: dict[bytes, Peer] = {}
        # Whose places a name takes: its group's (sl_pipeline.tenancy), each group's count
        # of places; a group not in ``places`` (or every name, by default) shares max_peers.
        self.group_of: Callable[[str], str] = lambda name: ""
        self.places: Mapping[str, int] = {}

    def name_of(self, hello: dict[str, Any], key: bytes | None) -> str:
        """The name a peer goes by: its admitted key's, never what the hello claims."""
        if key:
            return self.admitted_names[key]
        claimed = hello.get("client", "?")  # --insecure: whatever the peer says it is
        printable = isinstance(claimed, str) and claimed.isprintable()
        if not printable or len(claimed) > MAX_NAME_CHARS:
            raise ProtocolError("the hello's 'client' must be a printable name of 64 chars or less")
        return claimed

    def check_admission(self, hello: dict[str, Any], key: bytes | None) -> str:
        """The peer's name if it may join now; else the error to refuse its hello with."""
        if hello.get("model") != self.fingerprint:
            raise ProtocolError(
                f"model/topology mismatch: peer has {hello.get('model')!r}, this {self.role} has "
                f"{self.fingerprint!r}; use the same [model] section and topology on both sides"
            )
        name = self.name_of(hello, key)
        self.check_place(name)
        return name

    def check_place(self, name: str) -> None:
        """Whether ``name`` finds a place among its group's (every name's, without groups).

        Names, not sessions: a name's few pending sessions (PENDING_PER_NAME) hold one place
        between them, so one admitted name cannot lock other names out; and a name counts
        against its own group's places only, so one group's names cannot lock another's out."""
        pool = self.pool_of(name)
        limit = self.places.get(pool, self.listen.max_peers)
        mine = [p for p in self.peers.values() if p.name != name and self.pool_of(p.name) == pool]
        if len({p.name for p in mine}) < limit:  # a rejoin replaces its own old session
            return
        whose = f" (group {pool}'s places)" if pool else ""
        if len({p.name for p in mine if p.confirmed}) < limit:  # refuse; push out nobody
            self.on_bound("pending_handshakes")
            raise OverloadedError(
                f"{self.role} has too many unfinished handshakes{whose}; retry later"
            )
        raise OverloadedError(f"{self.role} is full ({limit} peers{whose}); retry later")

    def pool_of(self, name: str) -> str:
        """Whose places ``name`` takes: its group's, where it has places of its own; else
        "", the pool of every other name."""
        group = self.group_of(name)
        return group if group in self.places else ""

    def speaker(self, peer: Peer, msg: Message) -> str:
        """Whom a message speaks for. A configured relay forwards for its own clients, who
        are kept apart under the relay's name (``relay-1/client-1``); anyone else is its
        admitted name, whatever its ``client`` field says: no peer can open state, fill a
        group or take a turn under names of its own choosing."""
        if not msg.client or msg.client == peer.name or peer.name not in self.listen.relays:
            return peer.name
        qualified = f"{peer.name}/{msg.client}"
        if len(qualified) > MAX_ID_CHARS:
            raise ProtocolError(
                f"relay {peer.name}'s client {msg.client[:32]!r}... makes the name "
                f"{peer.name}/... of {len(qualified)} characters; at most {MAX_ID_CHARS} "
                "name a client here: give the clients behind the relay shorter names"
            )
        return qualified

    def add(self, identity: bytes, peer: Peer) -> list[bytes]:
        """A session that completed the handshake; returns the sessions to forget now.

        Handshakes that never send a message cost bounded memory: at most a few per name
        (the oldest of the *same* name go), and :meth:`check_admission` refuses newcomers
        when too many names have one pending (a name counts once, however many it has);
        nobody's pending handshake is pushed out by another name's."""
        self.peers[identity] = peer
        pending = [i for i, p in self.peers.items() if not p.confirmed and p.name == peer.name]
        return pending[: max(0, len(pending) - PENDING_PER_NAME)]

    def confirm(self, identity: bytes) -> list[bytes]:
        """The session's first sealed message opened: it is the name's session now, and the
        name's older sessions are to be forgotten (a replayed hello cannot evict anybody)."""
        peer = self.peers[identity]
        peer.confirmed = True
        return [i for i, p in self.peers.items() if p.name == peer.name and i != identity]

    def silent(self, now: float) -> list[tuple[bytes, float]]:
        """Sessions silent for longer than they may be, with how long; an unconfirmed one
        gets at most :data:`CONFIRM_TIMEOUT_S` to send its first message. A chunked message
        still assembling counts as silence from its first part: parts that trickle in
        cannot pin its buffers for longer than a silent peer is kept."""
        unconfirmed_s = min(self.listen.peer_timeout_s, CONFIRM_TIMEOUT_S)
        found = []
        for identity, peer in self.peers.items():
            limit = self.listen.peer_timeout_s if peer.confirmed else unconfirmed_s
            since = peer.last_seen if peer.partial_since is None else peer.partial_since
            if now - since > limit:
                found.append((identity, now - since))
        return found

    def other_assemblies(self, identity: bytes) -> list[bytes]:
        """Other sessions of this peer's name with a chunked message assembling: a name
        assembles one message at a time, so a key holder's extra sessions (a takeover, a
        rejoin) cannot each pin a message's buffers."""
        name = self.peers[identity].name
        return [
            i
            for i, p in self.peers.items()
            if i != identity and p.name == name and p.partial_since is not None
        ]

    def over_budget(self, max_bytes: int) -> bytes | None:
        """When the chunked messages being assembled, all peers together, hold more than
        ``max_bytes``: the peer holding the most (its session is to be dropped) of the group
        holding the most, where groups have places of their own: one group's many keys, each
        holding a little, push out their own, never another group's one big message."""
        if sum(p.partial_bytes for p in self.peers.values()) <= max_bytes:
            return None
        held: dict[str, int] = {}
        for peer in self.peers.values():
            pool = self.pool_of(peer.name)
            held[pool] = held.get(pool, 0) + peer.partial_bytes
        most = max(held, key=held.__getitem__)
        mine = [i for i, p in self.peers.items() if self.pool_of(p.name) == most]
        return max(mine, key=lambda i: self.peers[i].partial_bytes)

    def remove(self, identity: bytes) -> Peer | None:
        return self.peers.pop(identity, None)

    def confirmed(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.confirmed]

    def pending(self) -> int:
        return sum(1 for p in self.peers.values() if not p.confirmed)

    def status(self) -> dict[str, Any]:
        """Sessions that proved themselves (a replayed hello is no peer), and how many not."""
        peers = [{"name": p.name, "key": p.key, "applied": p.applied} for p in self.confirmed()]
        return {"peers": peers, "pending_handshakes": self.pending()}


def reject_reason(exc: SLError) -> str:
    """Why a peer's message was refused, as the metric's label."""
    if isinstance(exc, LimitError):
        return "oversized"
    if isinstance(exc, VersionError):
        return "version"
    if isinstance(exc, ReplayError):
        return "replay"
    if isinstance(exc, CryptoError):
        return "bad_tag"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    return "malformed"


def hello_refusal(exc: SLError) -> tuple[str, str]:
    """A refused hello as (handshake result, rejection reason), the metrics' labels."""
    if isinstance(exc, NotAdmittedError):
        result = "not_admitted"
    elif isinstance(exc, VersionError):
        result = "version"
    else:
        result = "bad_handshake"
    reason = "overloaded" if isinstance(exc, OverloadedError) else result
    reason = "replay" if isinstance(exc, ReplayError) else reason
    return result, reason if reason in (
        "not_admitted",
        "overloaded",
        "version",
        "replay",
    ) else "other"
