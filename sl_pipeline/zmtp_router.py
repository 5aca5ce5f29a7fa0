"""The listening end of a worker over asyncio: ZMTP read by :mod:`sl_pipeline.zmtp`, with a
ROUTER's semantics, so that clients keep their libzmq DEALER sockets unchanged.

Every connection gets a 5-byte routing id (``0x00`` + a counter, as libzmq makes them); a
message to an id that is gone is dropped silently (libzmq's ``ROUTER_MANDATORY=0``). Reading
goes through ``asyncio.BufferedProtocol``: a large frame is read straight into one buffer
of its announced, already capped, size. Each connection's inbound queue holds at most
``rcvhwm`` messages (what one read brings beyond them stays raw in the codec's read
buffer, and reading pauses, until there is room); what waits to go out to one peer is
bounded in bytes (over it, that peer is disconnected: a slow reader never blocks the rest).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import TransportError
from .gate import Gate
from .limits import Limits
from .transport import HANDSHAKE_IVL_MS, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from .zmtp import Caps, Credentials, Event, Ready, Received, Violation, ZmtpServer, caps_for
from .zmtp_frames import Buffer, encode, ping

log = logging.getLogger("sl_pipeline.zmtp")
OnGate = Callable[[str, str], None]  # (gate verdict, peer address)
OnDrop = Callable[[str, str, str], None]  # (reason, peer address, detail)
# The clients' libzmq settings (sl_pipeline.transport), in seconds: PING every 2 s, a peer
# silent for 10 s is gone, a handshake must finish within 15 s.
HEARTBEAT_IVL_S = HEARTBEAT_IVL_MS / 1000
HEARTBEAT_TIMEOUT_S = HEARTBEAT_TIMEOUT_MS / 1000
HANDSHAKE_IVL_S = HANDSHAKE_IVL_MS / 1000
MAX_TTL_S = 60.0  # a peer's announced heartbeat TTL is believed up to this
_JOIN_BELOW = 16 * 1024  # frames this small are joined into one write with their headers


def _nothing(*_: str) -> None:
    return None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` as (host, port); ``*`` is every interface, or any free port."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise TransportError(f"cannot bind {endpoint}: write it as tcp://HOST:PORT")
    host, port = endpoint[6:].rsplit(":", 1)
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    return host, 0 if port == "*" else int(port)


class _Connection(asyncio.BufferedProtocol):
    """One peer's connection: the codec, its inbound queue, its writes."""

    def __init__(self, router: ZmtpRouter, identity: bytes) -> None:
        self.router = router
        self.identity = identity
        self.codec = ZmtpServer(router.caps, router.mechanism)
        self.codec.room = router.rcvhwm  # messages past that stay raw in its read buffer
        self.transport: Any = None
        self.address = "?"
        self.inbox: deque[list[Buffer]] = deque()
        self.queued = self.paused = False
        self.opened = self.heard = self.pinged = time.monotonic()
        self.lock: asyncio.Lock | None = None  # a chunked message's parts back to back

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self.router.connections[self.identity] = self
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.heard = time.monotonic()
        events = self.codec.received(nbytes)
        if events:
            self.handle(events)
        if self.codec.wants_write:
            self.flush()

    def handle(self, events: list[Event]) -> None:
        router = self.router
        for event in events:
            if type(event) is Received:
                self.inbox.append(event.frames)
                router.arrived(self)
            elif isinstance(event, Credentials):
                self.handle(router.admit(self, event))
            elif isinstance(event, Ready):
                router.routable[self.identity] = self
            elif isinstance(event, Violation):
                router.drop(self, event.reason, event.detail)
                return
        if len(self.inbox) >= router.rcvhwm and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def taken(self) -> None:
        """A message left the inbound queue: messages already read fill the room first
        (also after the peer closed), then reading resumes."""
        room = self.router.rcvhwm - len(self.inbox)
        if not self.paused:
            self.codec.room = room
            return
        events = self.codec.allow(room)
        if events:
            self.handle(events)
        if len(self.inbox) < self.router.rcvhwm and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()
        if self.codec.wants_write:
            self.flush()

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def write(self, frames: Sequence[Buffer]) -> int:
        """One multipart message, bodies of large frames not copied; returns the bytes."""
        pieces = encode(frames)
        small: list[Buffer] = []
        nbytes = 0
        for index, piece in enumerate(pieces):
            size = memoryview(piece).nbytes
            nbytes += size if index % 2 else 0  # the bodies, as libzmq's sends counted
            if size < _JOIN_BELOW:
                small.append(piece)
                continue
            if small:
                self.transport.write(b"".join(small))
                small = []
            self.transport.write(piece)
        if small:
            self.transport.write(b"".join(small))
        return nbytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.lost(self)


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
        self.connections: dict[bytes, _Connection] = {}
        self.routable: dict[bytes, _Connection] = {}  # past the handshake
        self.departed: dict[bytes, _Connection] = {}  # closed, with messages still to read
        self._ring: deque[_Connection] = deque()  # connections with messages, in turn
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
                router._new_connection, host, port, reuse_address=True
            )
        except OSError as exc:
            raise TransportError(f"cannot bind {endpoint}: {exc}; is the port in use?") from None
        bound = router._server.sockets[0].getsockname()
        router.endpoint = f"tcp://{host}:{bound[1]}"
        router._ticker = asyncio.ensure_future(router._tick())
        return router

    def _new_connection(self) -> _Connection:
        self._next_id = (self._next_id + 1) % 2**32
        return _Connection(self, b"\x00" + self._next_id.to_bytes(4, "big"))

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
            frames = conn.inbox.popleft()
            conn.taken()  # may queue messages it had read but not parsed
            if conn.inbox:
                self._ring.append(conn)
            else:
                conn.queued = False
                self.departed.pop(conn.identity, None)
            return conn.identity, frames

    def pending(self) -> bool:
        """Whether a message is already waiting (the next ``recv`` returns at once)."""
        return bool(self._ring)

    def address_of(self, identity: bytes) -> str:
        conn = self.connections.get(identity) or self.departed.get(identity)
        return conn.address if conn is not None else "?"

    def arrived(self, conn: _Connection) -> None:
        if not conn.queued:
            conn.queued = True
            self._ring.append(conn)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def admit(self, conn: _Connection, hello: Credentials) -> list[Event]:
        """The gate decides on a PLAIN HELLO, as libzmq's ZAP handler did (RFC 27)."""
        assert self.gate is not None
        verdict = self.gate.check(hello.username, hello.password, time.time())
        self.on_gate(verdict.reason, conn.address)
        if verdict.reason == "ok":
            return conn.codec.accept()
        conn.codec.refuse(b"400")
        conn.flush()
        conn.transport.close()  # after the ERROR has gone out
        return []

    def drop(self, conn: _Connection, reason: str, detail: str) -> None:
        """Disconnect a peer (a broken protocol, a cap, silence); says why to ``on_drop``."""
        self.on_drop(reason, conn.address, detail)
        if conn.transport.get_write_buffer_size():
            conn.transport.abort()  # what waits to go out to it is dropped with it
        else:  # a FIN after what was sent (the greeting: libzmq then names a mismatch)
            conn.transport.close()
        conn.inbox.clear()  # a dropped peer's unread messages go with it
        self.lost(conn)

    def lost(self, conn: _Connection) -> None:
        """A closed connection: what it sent before it closed is still read (as libzmq
        reads a pipe up to its end); replies to it are dropped."""
        self.connections.pop(conn.identity, None)
        self.routable.pop(conn.identity, None)
        if conn.inbox:
            self.departed[conn.identity] = conn

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

    def _check_time(self, conn: _Connection, now: float) -> None:
        if not conn.codec.ready:
            if now - conn.opened > HANDSHAKE_IVL_S:
                self.drop(conn, "handshake_timeout", "no handshake within 15 s")
            return
        if conn.paused:  # not read while its queue is full: that silence is ours, not its
            conn.heard = now
        ttl = max(HEARTBEAT_TIMEOUT_S, min(conn.codec.peer_ttl_s, MAX_TTL_S))
        if now - conn.heard > ttl:
            self.drop(conn, "silent", f"silent for {now - conn.heard:.0f}s")
        elif now - conn.pinged >= HEARTBEAT_IVL_S and not conn.transport.is_closing():
            conn.pinged = now
            conn.transport.write(ping(int(HEARTBEAT_TIMEOUT_S * 10)))

    def close(self, linger_ms: int = 0) -> None:
        """Stop listening and close every connection (what is queued to go out may leave
        for ``linger_ms``; call :meth:`drain` first to wait for it)."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
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
            conn.inbox.clear()
            self.lost(conn)
        self.departed.clear()
        self._ring.clear()
