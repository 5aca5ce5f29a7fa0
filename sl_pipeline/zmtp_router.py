"""The listening end of a worker over asyncio: ZMTP read by :mod:`sl_pipeline.zmtp`, with a
ROUTER's semantics, so that clients keep their libzmq DEALER sockets unchanged.

Every connection gets a 5-byte routing id (``0x00`` + a counter, as libzmq makes them); a
message to an id that is gone is dropped silently (libzmq's ``ROUTER_MANDATORY=0``). Reading
goes through ``asyncio.BufferedProtocol``: a large frame is read straight into one buffer
of its announced, already capped, size. Each connection's inbound queue holds at most
``rcvhwm`` messages and ``INBOX_BYTES``, all queues ``INBOUND_BYTES`` together (what a read
brings beyond them stays raw in the codec's read buffer, and reading pauses, until there is
room; :mod:`sl_pipeline.zmtp_conn`); one admitted key holds ``MAX_CONNECTIONS_PER_KEY``
connections at most; what waits to go out to one peer is bounded in bytes (over it, that
peer is disconnected: a slow reader never blocks the rest).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import TransportError
from .gate import MAX_CONNECTIONS_PER_KEY, ZAP_TOO_MANY, Gate, Verdict
from .limits import Limits
from .transport import HANDSHAKE_IVL_MS, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from .zmtp import Caps, Credentials, Event, caps_for
from .zmtp_accept import Acceptor
from .zmtp_conn import Connection
from .zmtp_frames import Buffer, ping
from .zmtp_pending import PER_ADDRESS, PendingHandshakes

log = logging.getLogger("sl_pipeline.zmtp")
OnGate = Callable[[str, str], None]  # (gate verdict, peer address)
OnDrop = Callable[[str, str, str], None]  # (reason, peer address, detail)
# The clients' libzmq settings (sl_pipeline.transport), in seconds: PING every 2 s, a peer
# silent for 10 s is gone, a handshake must finish within 15 s.
HEARTBEAT_IVL_S = HEARTBEAT_IVL_MS / 1000
HEARTBEAT_TIMEOUT_S = HEARTBEAT_TIMEOUT_MS / 1000
HANDSHAKE_IVL_S = HANDSHAKE_IVL_MS / 1000
MAX_TTL_S = 60.0  # a peer's announced heartbeat TTL is believed up to this
# What one connection's inbound queue may hold (costs as zmtp.Received.cost: bytes, plus
# zmtp.FRAME_OVERHEAD a frame), and what all queues hold together, closed connections'
# included; past either, reading pauses until they drain. A queue always takes one
# message, so the process-wide ceiling is INBOUND_BYTES plus one message a connection.
INBOX_BYTES = 8 * 2**20
INBOUND_BYTES = 64 * 2**20
WRITE_STALL_S = 60.0  # a peer that takes nothing this long while output waits is dropped


def _nothing(*_: str) -> None:
    return None


def listen_advice(exc: OSError, host: str, key: str) -> str:
    """What to do when listening on ``host`` (the config's ``key``) failed with ``exc``."""
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"this machine has no address {host}: set {key} to one of its own addresses "
            "(or 0.0.0.0 for all of them)"
        )
    if exc.errno == errno.EACCES:
        return f"ports below 1024 need privileges: choose a port from 1024 up in {key}"
    return f"another process holds the port: stop it, or choose another port in {key}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` as (host, port); ``*`` is every interface, or any free port."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise TransportError(f"cannot bind {endpoint}: write it as tcp://HOST:PORT")
    host, port = endpoint[6:].rsplit(":", 1)
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    return host, 0 if port == "*" else int(port)


class ZmtpRouter:
    """The interface of the libzmq ROUTER it replaces: ``recv``, ``send``, ``send_parts``,
    ``close``; plus ``address_of`` (libzmq's ``Peer-Address``) and ``pending``."""

    def __init__(
        self,
        limits: Limits,
        gate: Gate | None = None,
        on_gate: OnGate = _nothing,
        rcvhwm: int = 64,
        on_drop: OnDrop = _nothing,
        caps: Caps | None = None,  # what caps_for(limits) derives, unless told (benches)
    ) -> None:
        self.caps: Caps = caps or caps_for(limits)
        self.mechanism = b"PLAIN" if gate is not None else b"NULL"
        self.gate = gate
        self.on_gate, self.on_drop = on_gate, on_drop
        self.rcvhwm = rcvhwm
        # What may wait to go out to one peer: the largest message a peer may take, and one more.
        self.max_outbound = limits.max_message_bytes + self.caps.message_bytes
        self.connections: dict[bytes, Connection] = {}
        self.routable: dict[bytes, Connection] = {}  # past the handshake
        self.departed: dict[bytes, Connection] = {}  # closed, with messages still to read
        # Closed connections with nothing left to read: their sessions can end now (a
        # reconnect is a new connection, a new identity, so nothing can resume them).
        self.gone: list[bytes] = []
        self.inbox_bytes, self.inbound_bytes = INBOX_BYTES, INBOUND_BYTES  # the budgets
        self.inbound = 0  # the costs queued on all connections
        self.departed_raw = 0  # bytes closed connections sent that are not parsed yet
        self.starved: deque[Connection] = deque()  # held back by a budget, in turn
        self.per_key: dict[bytes, int] = {}  # open connections of each admitted key
        self.handshaking = PendingHandshakes()  # connections still in the handshake
        self._accepting: dict[bytes, Connection] = {}  # accepted, no transport yet
        self._acceptor: Acceptor | None = None
        self._ring: deque[Connection] = deque()  # connections with messages, in turn
        self._waiter: asyncio.Future[None] | None = None
        self._next_id = secrets.randbelow(2**31)
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.endpoint = ""

    @classmethod
    async def bind(cls, endpoint: str, limits: Limits, **options: Any) -> ZmtpRouter:
        router = cls(limits, **options)
        host, port = split_endpoint(endpoint)
        loop = asyncio.get_running_loop()
        try:
            router._server = await loop.create_server(
                router._new_connection, host, port, reuse_address=True, start_serving=False
            )
        except OSError as exc:
            raise TransportError(f"cannot bind {endpoint}: {exc.strerror or exc}") from exc
        bound = router._server.sockets[0].getsockname()
        router.endpoint = f"tcp://{host}:{bound[1]}"
        router._acceptor = Acceptor(router._server, router._admit_address)
        router._acceptor.start()
        router._ticker = asyncio.ensure_future(router._tick())
        return router

    def _new_connection(self) -> Connection:
        self._next_id = (self._next_id + 1) % 2**32
        return Connection(self, b"\x00" + self._next_id.to_bytes(4, "big"))

    # ---- receiving -------------------------------------------------------------------
    async def recv(self) -> tuple[bytes, list[Buffer]]:
        """The next message, from each connection with messages in turn."""
        while True:
            while not self._ring:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            conn = self._ring.popleft()
            if not conn.inbox:  # closed meanwhile
                conn.queued = False
                continue
            frames = conn.take()  # may queue messages it had read but not parsed
            if conn.inbox:
                self._ring.append(conn)
            else:
                conn.queued = False
                if not conn.codec.blocked:
                    self.settle(conn)
            self.wake()
            return conn.identity, frames

    def wake(self) -> None:
        """Room was made: the longest held-back connection parses what it can."""
        if self.starved:
            conn = self.starved.popleft()
            conn.starving = False
            conn.pump()

    def settle(self, conn: Connection) -> None:
        """A closed connection with nothing left to read is forgotten."""
        if self.departed.pop(conn.identity, None) is not None:
            self.departed_raw -= conn.raw
            self._release_key(conn)
            self.gone.append(conn.identity)

    def _release_key(self, conn: Connection) -> None:
        if conn.key is not None and conn.key in self.per_key:
            left = self.per_key.pop(conn.key) - 1
            if left:
                self.per_key[conn.key] = left

    def pending(self) -> bool:
        """Whether a message is already waiting (the next ``recv`` returns at once)."""
        return bool(self._ring)

    def address_of(self, identity: bytes) -> str:
        conn = self.connections.get(identity) or self.departed.get(identity)
        return conn.address if conn is not None else "?"

    def key_of(self, identity: bytes) -> bytes | None:
        """The admitted key the gate let connection ``identity`` in with (None: no gate)."""
        conn = self.connections.get(identity) or self.departed.get(identity)
        return conn.key if conn is not None else None

    def arrived(self, conn: Connection) -> None:
        if not conn.queued:
            conn.queued = True
            self._ring.append(conn)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _admit_address(self, address: str) -> Connection | None:
        """A connection just accepted from ``address``: its protocol, or None (close it at
        once) when its address holds PER_ADDRESS handshakes already. All addresses together
        hold a bounded number; at it, the biggest holder's oldest goes (zmtp_pending)."""
        conn = self._new_connection()
        keep, evicted = self.handshaking.open(conn.identity, address)
        if evicted is not None:
            self._evict(evicted)
        if not keep:
            detail = f"{PER_ADDRESS} connections from its address are in the handshake already"
            self.on_drop("pending", address, detail)
            return None
        conn.address = address
        self._accepting[conn.identity] = conn
        return conn

    def _evict(self, identity: bytes) -> None:
        conn = self.connections.get(identity)
        if conn is not None:
            self.drop(conn, "pending", "closed to make room: strangers hold the handshakes")
        elif (waiting := self._accepting.pop(identity, None)) is not None:  # no transport yet
            self.on_drop("pending", waiting.address, "closed to make room before it started")

    def made(self, conn: Connection) -> bool:
        """Its transport exists: whether it may go on (it was not closed to make room)."""
        return self._accepting.pop(conn.identity, None) is not None

    def admit(self, conn: Connection, hello: Credentials) -> list[Event]:
        """The gate decides on a PLAIN HELLO, as libzmq's ZAP handler did (RFC 27)."""
        assert self.gate is not None
        verdict = self.gate.check(hello.username, hello.password, time.time())
        key = verdict.key
        if key is not None and self.per_key.get(key, 0) >= MAX_CONNECTIONS_PER_KEY:
            verdict = Verdict(key, "connections")  # the client reports ZAP_TOO_MANY
        self.on_gate(verdict.reason, conn.address)
        if verdict.reason == "ok" and key is not None:
            conn.key = key
            self.per_key[key] = self.per_key.get(key, 0) + 1
            return conn.codec.accept()
        too_many = verdict.reason == "connections"
        conn.codec.refuse(str(ZAP_TOO_MANY).encode() if too_many else b"400")
        conn.flush()
        conn.transport.close()  # after the ERROR has gone out
        return []

    def drop(self, conn: Connection, reason: str, detail: str) -> None:
        """Disconnect a peer (a broken protocol, a cap, silence); says why to ``on_drop``."""
        self.on_drop(reason, conn.address, detail)
        if conn.transport.get_write_buffer_size():
            conn.transport.abort()  # what waits to go out to it is dropped with it
        else:  # a FIN after what was sent (the greeting: libzmq then names a mismatch)
            conn.transport.close()
        conn.discard()  # a dropped peer's unread messages go with it
        self.lost(conn)

    def lost(self, conn: Connection) -> None:
        """A closed connection: what it sent before it closed is still read (as libzmq
        reads a pipe up to its end); replies to it are dropped."""
        # A closed connection with a backlog keeps its place among its key's connections
        # until the backlog is read (settle): else one key could leave backlogs without end.
        self.handshaking.close(conn.identity)
        self._accepting.pop(conn.identity, None)
        was_open = self.connections.pop(conn.identity, None) is not None
        self.routable.pop(conn.identity, None)
        if conn.identity in self.departed:
            return
        if not (conn.inbox or conn.codec.blocked):
            if was_open:
                self._release_key(conn)
                self.gone.append(conn.identity)
            return
        conn.codec.finish()  # what it holds is then what it sent and we did not parse
        conn.raw = conn.codec.unparsed
        if self.inbound + self.departed_raw + conn.raw > self.inbound_bytes:
            self.on_drop("backlog", conn.address, "closed; its backlog is over the inbound budget")
            conn.discard()  # what all queues share is spent: a closed peer's is dropped first
            if was_open:
                self._release_key(conn)
                self.gone.append(conn.identity)
            return
        self.departed[conn.identity] = conn
        self.departed_raw += conn.raw

    # ---- sending ---------------------------------------------------------------------
    async def send(self, identity: bytes, frames: Sequence[Buffer]) -> int:
        return await self.send_parts(identity, [frames])

    async def send_parts(self, identity: bytes, parts: Iterable[Sequence[Buffer]]) -> int:
        """A message as its parts (``Channel.parts``), back to back on its connection;
        0 if the peer is gone. Parts are sealed as they go (the loop writes one while the
        next is sealed); a peer that lets too much pile up is disconnected."""
        conn = self.routable.get(identity)
        if conn is None:
            return 0
        if conn.lock is None:
            conn.lock = asyncio.Lock()
        nbytes = 0
        async with conn.lock:
            for frames in parts:
                if conn.transport.is_closing():
                    return nbytes
                nbytes += conn.write(frames)
                backlog = conn.transport.get_write_buffer_size()
                if backlog > self.max_outbound:
                    self.drop(conn, "outbound", f"{backlog} bytes wait to go out to it")
                    return nbytes
                if backlog:
                    await asyncio.sleep(0)  # let the loop write while the next part is sealed
        return nbytes

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until what was sent has left, e.g. shutdown notices."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            c.transport.get_write_buffer_size() for c in self.connections.values()
        ):
            await asyncio.sleep(0.01)

    # ---- time ------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Handshake deadline, PINGs, and peers silent past their TTL."""
        while True:
            await asyncio.sleep(HEARTBEAT_IVL_S / 2)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                self._check_time(conn, now)

    def _check_time(self, conn: Connection, now: float) -> None:
        if not conn.codec.ready:
            if now - conn.opened > HANDSHAKE_IVL_S:
                self.drop(conn, "handshake_timeout", "no handshake within 15 s")
            return
        if conn.write_paused and now - conn.stalled > WRITE_STALL_S:
            return self.drop(conn, "outbound", f"took nothing for {now - conn.stalled:.0f}s")
        if conn.paused:  # not read while a budget held it back: that silence is ours
            conn.heard = now
        ttl = max(HEARTBEAT_TIMEOUT_S, min(conn.codec.peer_ttl_s, MAX_TTL_S))
        if now - conn.heard > ttl:
            self.drop(conn, "silent", f"silent for {now - conn.heard:.0f}s")
        elif now - conn.pinged >= HEARTBEAT_IVL_S and not conn.transport.is_closing():
            conn.pinged = now
            conn.transport.write(ping(int(HEARTBEAT_TIMEOUT_S * 10)))
        return None

    def close(self, linger_ms: int = 0) -> None:
        """Stop listening and close every connection (what is queued to go out may leave
        for ``linger_ms``; call :meth:`drain` first to wait for it)."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._acceptor is not None:
            self._acceptor.stop()
            self._acceptor = None
        if self._server is not None:
            self._server.close()
            self._server = None
        loop = asyncio.get_event_loop()
        for conn in list(self.connections.values()):
            if linger_ms > 0:
                conn.transport.close()  # after what is queued, for at most linger_ms
                loop.call_later(linger_ms / 1000, conn.transport.abort)
            else:
                conn.transport.abort()
            conn.discard()
            self.lost(conn)
        for conn in self.departed.values():
            conn.discard()
        self.departed.clear()
        self.departed_raw = 0
        self.starved.clear()
        self._ring.clear()
