"""One connection of :class:`sl_pipeline.zmtp_router.ZmtpRouter`: its codec, its inbound
queue within the router's budgets, its writes.

Each queue is bounded in messages (``rcvhwm``) and in bytes (``zmtp.Received.cost``:
bytes plus a per-frame overhead), and all queues share one budget; what a read brings
beyond them stays raw in the codec's buffer, and reading pauses, until there is room. The
codec parses at most ``zmtp.STEPS_PER_CALL`` items per callback, so one peer's read never
holds the loop for long; a peer that does not read what we send has its reading paused too.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .zmtp import Credentials, Event, Ready, Received, Violation, ZmtpServer
from .zmtp_frames import Buffer, encode

_JOIN_BELOW = 16 * 1024  # frames this small are joined into one write with their headers
WRITE_HIGH = 2**20  # past this waiting to go out, the peer's reading pauses too


class Connection(asyncio.BufferedProtocol):
    """One peer's connection: the codec, its inbound queue, its writes."""

    def __init__(self, router: Any, identity: bytes) -> None:
        # router: the ZmtpRouter that owns it (not imported: that module imports this one)
        self.router = router
        self.identity = identity
        self.codec = ZmtpServer(router.caps, router.mechanism)
        self.transport: Any = None
        self.address = "?"
        self.key: bytes | None = None  # the admitted key it came in with
        self.inbox: deque[tuple[list[Buffer], int]] = deque()  # (frames, cost)
        self.inbox_bytes = 0  # the costs queued (zmtp.Received.cost)
        self.raw = 0  # bytes read and not parsed when it closed (ZmtpRouter.departed_raw)
        self.queued = self.paused = self.write_paused = self.starving = self.due = False
        self.opened = self.heard = self.pinged = self.stalled = time.monotonic()
        self.lock: asyncio.Lock | None = None  # a chunked message's parts back to back

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else self.address
        if not self.router.made(self):  # closed to make room before its transport existed
            transport.abort()
            return
        self.router.connections[self.identity] = self
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.heard = time.monotonic()
        self.codec.room, self.codec.room_bytes = self.room()
        self.after(self.codec.received(nbytes))

    def room(self) -> tuple[int, int]:
        """What its queue may still take: messages, and their cost within its own byte
        budget and what all queues share. An empty queue always takes one message."""
        router = self.router
        shared = router.inbound_bytes - router.inbound - router.departed_raw
        nbytes = min(router.inbox_bytes - self.inbox_bytes, shared)
        return router.rcvhwm - len(self.inbox), nbytes if self.inbox else max(nbytes, 1)

    def after(self, events: list[Event]) -> None:
        if events:
            self.handle(events)
        if self.codec.wants_write:
            self.flush()
        self.steer()

    def steer(self) -> None:
        """Read while the codec can take more: a parse held back by its budgets resumes
        on the next loop turn (steps: the others' callbacks run first) or when its queue,
        or the queues together, drain (:meth:`take`, ``ZmtpRouter.wake``)."""
        codec = self.codec
        if codec.blocked and codec.room > 0 and codec.room_bytes > 0:
            if not self.due:
                self.due = True
                asyncio.get_running_loop().call_soon(self.pump)
        elif codec.blocked and not self.starving:
            self.starving = True
            self.router.starved.append(self)
        pause = codec.blocked or self.write_paused  # and a peer that does not read
        if pause != self.paused:
            self.paused = pause
            (self.transport.pause_reading if pause else self.transport.resume_reading)()

    def pump(self) -> None:
        """Parse what was read and held back, as far as the budgets allow now."""
        self.due = False
        self.after(self.codec.allow(*self.room()))
        if not self.inbox and not self.codec.blocked:
            self.router.settle(self)

    def handle(self, events: list[Event]) -> None:
        router = self.router
        for event in events:
            if type(event) is Received:
                self.inbox.append((event.frames, event.cost))
                self.inbox_bytes += event.cost
                router.inbound += event.cost
                router.arrived(self)
            elif isinstance(event, Credentials):
                self.handle(router.admit(self, event))
            elif isinstance(event, Ready):
                router.routable[self.identity] = self
                router.handshaking.close(self.identity)
            elif isinstance(event, Violation):
                router.drop(self, event.reason, event.detail)
                return

    def take(self) -> list[Buffer]:
        """A message leaves the queue: messages already read fill the room first (also
        after the peer closed), then reading resumes."""
        frames, cost = self.inbox.popleft()
        self.inbox_bytes -= cost
        self.router.inbound -= cost
        if self.codec.blocked:
            self.pump()
        return frames

    def discard(self) -> None:
        """Drop its unread messages, and what it sent that was not parsed yet."""
        self.router.inbound -= self.inbox_bytes
        self.inbox.clear()
        self.inbox_bytes = 0
        self.codec.discard()

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))
            backlog = self.transport.get_write_buffer_size()
            if backlog > self.router.max_outbound:  # PONGs too: a PINGer that never reads
                self.router.drop(self, "outbound", f"{backlog} bytes wait to go out to it")

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

    def pause_writing(self) -> None:
        self.write_paused, self.stalled = True, time.monotonic()
        self.steer()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.steer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.lost(self)
