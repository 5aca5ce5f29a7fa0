"""ZMTP 3.x, the listening end, sans-IO: greeting, NULL and PLAIN, frames, heartbeats.

libzmq bounds each frame (``MAXMSGSIZE``) but not how many frames one multipart message
has: its pipe shows a message only when complete, so an admitted peer could make a worker
buffer one message of any size. This codec reads ZMTP itself (RFC 23/37 framing, RFC 24
PLAIN; the gate decides as RFC 27's ZAP handler did) and checks every frame header against
:class:`Caps` *before* the body is read: frames per message, bytes per message, bytes per
frame, and the bytes a peer may send before it is authenticated. Clients keep libzmq.

Feed it with :meth:`ZmtpServer.get_buffer` / :meth:`ZmtpServer.received` (or :meth:`feed`);
take what to write from :meth:`ZmtpServer.data_to_send`. Events: :class:`Credentials` (PLAIN
HELLO: answer with :meth:`ZmtpServer.accept` or :meth:`ZmtpServer.refuse` before feeding
more), :class:`Ready`, :class:`Received` (one message), :class:`Command`, :class:`Violation`
(the connection must close; the codec reads nothing more).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .chunked import empty_buffer
from .zmtp_frames import (
    COMMAND,
    GREETING_BYTES,
    LONG,
    MORE,
    Buffer,
    command,
    frame_head,
    greeting,
    metadata,
    parse_metadata,
    ttl_of,
)
from .zmtp_frames import HANDSHAKE_BYTES as HANDSHAKE_BYTES
from .zmtp_frames import Caps as Caps
from .zmtp_frames import caps_for as caps_for
from .zmtp_frames import max_frame_bytes as max_frame_bytes

COMMAND_MAX = 1024  # after the handshake: PING/PONG are <= 24 bytes
SCRATCH_BYTES = 256 * 1024  # headers and small frames are read into this, many per recv
BIG_FRAME = 64 * 1024  # a frame this big is read straight into its own buffer
# What one queued frame costs beyond its bytes (a bytes object, its list slot): the byte
# budgets of inbound queues count it, so a flood of empty frames is not free.
FRAME_OVERHEAD = 100
# Items (frames, commands) parsed per call: one peer's read cannot hold the loop for long.
STEPS_PER_CALL = 512
_SIZE = struct.Struct(">Q")
# libzmq 4.3 spells the PLAIN ERROR command's name "\x5ERROR" in C, a hex escape: 0x5E then
# "RROR". Its clients recognise only that form (and then report a failed authentication,
# which is what a refused client must see); the RFC's "\x05ERROR" reads to them as an
# unexpected command. Either way the connection is refused.
_ERROR = b"\x5eRROR"
_PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")  # what a ROUTER talks to (RFC 28)
_GREETING, _HEADER, _HANDSHAKE, _READY = range(4)


@dataclass(frozen=True)
class Credentials:
    """A PLAIN HELLO: the codec waits for :meth:`ZmtpServer.accept` or ``refuse``."""

    username: bytes
    password: bytes


@dataclass(frozen=True)
class Ready:
    """The handshake is done; ``metadata`` is the peer's (``Socket-Type``, ``Identity``)."""

    metadata: dict[str, bytes]


@dataclass(frozen=True)
class Received:
    """One whole multipart message; ``cost`` is its bytes plus ``FRAME_OVERHEAD`` a frame."""

    frames: list[Buffer]
    cost: int = 0


@dataclass(frozen=True)
class Command:
    """A command after the handshake (a PING is answered already)."""

    name: bytes
    body: bytes


@dataclass(frozen=True)
class Violation:
    """The peer broke the protocol or a cap: close the connection. ``reason`` is a
    ``sl_rejected_messages_total`` reason (``oversized``, ``malformed``, ``not_admitted``)."""

    reason: str
    detail: str


Event = Credentials | Ready | Received | Command | Violation


class ZmtpServer:
    """One connection's server end. ``mechanism`` is ``b"PLAIN"`` (keyed workers: the
    password is the gate token) or ``b"NULL"`` (``--insecure``)."""

    def __init__(self, caps: Caps, mechanism: bytes = b"PLAIN") -> None:
        if mechanism not in (b"PLAIN", b"NULL"):
            raise ValueError(f"unsupported ZMTP mechanism {mechanism!r}")
        self.caps = caps
        self.mechanism = mechanism
        self.peer_ttl_s = 0.0  # from the peer's PINGs: silent longer, it is gone
        self.closed: Violation | None = None
        # A stranger is read through a buffer of the handshake budget only.
        self._buf = bytearray(caps.handshake_bytes)
        self._start = self._end = 0
        self._state = _GREETING
        self._hello_seen = self._verdict_due = False
        self._spent = 0  # bytes parsed before READY
        self._frames: list[Buffer] = []
        self._message_bytes = 0
        self._big: memoryview | None = None  # a large frame being read, in place
        self._big_at = self._big_flags = 0
        self._out: list[Buffer] = [greeting(mechanism)]
        self._unfed = b""  # what feed() held back while a verdict was due
        # Whole messages (and their cost, in bytes) it may still hand out: the reader's
        # queue has room for this much. At 0, bytes already read stay unparsed (raw, in the
        # read buffer) until allow(). ``blocked``: the last parse stopped at a budget (room,
        # or STEPS_PER_CALL) with bytes left, not for want of bytes.
        self.room = 2**62
        self.room_bytes = 2**62
        self.blocked = False
        self._pong: bytes | None = None  # one PONG pending at most, to the latest PING
        self._final = False  # the peer closed: the buffer holds exactly what is left

    @property
    def ready(self) -> bool:
        return self._state == _READY

    # ---- reading ---------------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next bytes go: the rest of a large frame, else free scratch space."""
        if self._big is not None:
            return self._big[self._big_at :]
        if self.closed is not None:
            return memoryview(bytearray(256))  # read and dropped until the close lands
        return memoryview(self._buf)[self._end :]

    def received(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written at :meth:`get_buffer`; the events they complete."""
        if self.closed is not None:
            return []
        events: list[Event] = []
        if self._big is not None:
            self._big_at += nbytes
            if self._big_at < self._big.nbytes:
                return events
            frame, self._big = self._big, None
            self._frame(self._big_flags, frame, events)
        else:
            self._end += nbytes
        self._parse(events)
        return events

    def feed(self, data: Buffer) -> list[Event]:
        """``data`` as if received (copied through :meth:`get_buffer`; for tests)."""
        view, events = memoryview(data).cast("B"), []
        while view.nbytes and self.closed is None and not self._verdict_due:
            target = self.get_buffer()
            if not target.nbytes:
                break
            n = min(target.nbytes, view.nbytes)
            target[:n] = view[:n]
            view = view[n:]
            events += self.received(n)
        if view.nbytes and self._verdict_due:
            self._unfed = bytes(view)
        return events

    def _parse(self, events: list[Event]) -> None:
        steps, self.blocked = STEPS_PER_CALL, False
        while self.closed is None and not self._verdict_due and self._big is None:
            if self.room <= 0 or self.room_bytes <= 0 or steps <= 0:
                self.blocked = self._end > self._start
                break
            steps -= 1
            if not self._step(events):
                break
        if self._start == self._end:
            self._start = self._end = 0
        elif not self._final and len(self._buf) - self._start < BIG_FRAME + 9:  # must fit
            self._buf[: self._end - self._start] = self._buf[self._start : self._end]
            self._start, self._end = 0, self._end - self._start

    def _step(self, events: list[Event]) -> bool:
        """Parse one item (greeting, or frame) if whole; False if more bytes are needed."""
        buf, at, have = self._buf, self._start, self._end - self._start
        if self._state == _GREETING:
            if have >= GREETING_BYTES:
                self._start += GREETING_BYTES
                self._spent += GREETING_BYTES
                self._greeting(bytes(buf[at : at + GREETING_BYTES]), events)
            return self.closed is None and have >= GREETING_BYTES
        flags = buf[at] if have else 0
        head = 9 if flags & LONG else 2
        if have < head:
            return False
        size = _SIZE.unpack_from(buf, at + 1)[0] if flags & LONG else buf[at + 1]
        refusal = self._check(flags, size)
        if refusal is not None:
            self._violate(*refusal, events)
            return False
        if have < head + size and size < BIG_FRAME:
            return False  # a small frame: wait until it is whole in the scratch buffer
        self._spent += 0 if self._state == _READY else head + size
        self._message_bytes += 0 if flags & COMMAND else size
        if have >= head + size:
            self._start += head + size
            self._frame(flags, bytes(buf[at + head : at + head + size]), events)
            return True
        if self._final:  # the peer closed: the rest of this frame never comes
            self._frames, self._message_bytes, self._start = [], 0, self._end
            return False
        self._big, self._big_flags = empty_buffer(size), flags  # read straight into it
        self._big_at = have - head
        self._big[: self._big_at] = buf[at + head : self._end]
        self._start = self._end
        return False

    def _check(self, flags: int, size: int) -> tuple[str, str] | None:
        """What a frame's header announces, refused before its body is read."""
        caps = self.caps
        if flags & ~(MORE | LONG | COMMAND):
            return "malformed", f"frame flags {flags:#04x} have reserved bits set"
        if self._state != _READY:
            if not flags & COMMAND:
                return "malformed", "a message frame before the handshake finished"
            if self._spent + size + 9 > caps.handshake_bytes:
                return "oversized", f"a handshake of over {caps.handshake_bytes} bytes"
            return None
        if flags & COMMAND:
            return ("oversized", f"a command of {size} bytes") if size > COMMAND_MAX else None
        if size > caps.frame_bytes:
            return "oversized", f"a frame of {size} bytes; the limit is {caps.frame_bytes}"
        if len(self._frames) >= caps.message_frames:
            return "oversized", f"a message of over {caps.message_frames} frames"
        if self._message_bytes + size > caps.message_bytes:
            return "oversized", f"a message of over {caps.message_bytes} bytes"
        return None

    def _violate(self, reason: str, detail: str, events: list[Event]) -> None:
        self.closed = Violation(reason, detail)
        events.append(self.closed)
        self._frames, self._big, self._buf = [], None, bytearray()
        self._start = self._end = 0

    def _greeting(self, data: bytes, events: list[Event]) -> None:
        if data[0] != 0xFF or not data[9] & 1:
            return self._violate("malformed", "not a ZMTP 3 greeting", events)
        if data[10] < 3:
            return self._violate("malformed", f"ZMTP version {data[10]}; 3 or newer needed", events)
        mechanism = data[12:32].rstrip(b"\x00")
        if mechanism != self.mechanism:
            what = f"mechanism {mechanism!r}, this worker speaks {self.mechanism.decode()}"
            return self._violate("malformed", what, events)
        self._state = _HANDSHAKE
        return None

    # ---- frames and commands ---------------------------------------------------------
    def _frame(self, flags: int, body: Buffer, events: list[Event]) -> None:
        if not flags & COMMAND:
            self._frames.append(body)
            if not flags & MORE:
                cost = self._message_bytes + FRAME_OVERHEAD * len(self._frames)
                events.append(Received(self._frames, cost))
                self._frames, self._message_bytes = [], 0
                self.room -= 1
                self.room_bytes -= cost
            return
        data = bytes(body)
        name = data[1 : 1 + data[0]] if data else b""
        rest = data[1 + len(name) :]
        if self._state == _READY:
            self._command(name, rest, events)
        elif self.mechanism == b"NULL":
            self._null_step(name, rest, events)
        else:
            self._plain_step(name, rest, events)

    def _command(self, name: bytes, rest: bytes, events: list[Event]) -> None:
        if name == b"PING":  # answered once, to the latest: a flood of PINGs queues nothing
            self.peer_ttl_s = ttl_of(rest)
            self._pong = command(b"PONG", rest[2:18])  # the context, echoed
        elif name == b"ERROR":
            return self._violate("malformed", "the peer sent ERROR", events)
        events.append(Command(name, rest))  # a flood's are few per call (STEPS_PER_CALL)
        return None

    def _null_step(self, name: bytes, rest: bytes, events: list[Event]) -> None:
        if name != b"READY":
            return self._violate("malformed", f"{name!r} where READY was due", events)
        self._finish(rest, events)
        return None

    def _plain_step(self, name: bytes, rest: bytes, events: list[Event]) -> None:
        if name == b"HELLO" and not self._hello_seen:
            user = rest[1 : 1 + rest[0]] if rest else b""
            after = rest[1 + len(user) :]
            password = after[1 : 1 + after[0]] if after else b""
            if not rest or not after or len(after) != 1 + len(password):
                return self._violate("malformed", "a malformed PLAIN HELLO", events)
            self._hello_seen = self._verdict_due = True
            events.append(Credentials(user, password))
        elif name == b"INITIATE" and self._hello_seen:
            self._finish(rest, events)
        else:
            self._violate("malformed", f"{name!r} out of turn in the PLAIN handshake", events)
        return None

    def _finish(self, properties: bytes, events: list[Event]) -> None:
        """The peer's metadata arrived: answer READY, and read messages from now on."""
        meta = parse_metadata(properties)
        if meta is None or meta.get("socket-type") not in _PEER_TYPES:
            kind = None if meta is None else meta.get("socket-type")
            return self._violate("malformed", f"peer metadata unusable (type {kind!r})", events)
        self._out.append(command(b"READY", metadata({"Socket-Type": b"ROUTER"})))
        self._state = _READY
        scratch = bytearray(SCRATCH_BYTES)  # admitted: a buffer that reads many at once
        scratch[: self._end - self._start] = self._buf[self._start : self._end]
        self._buf, self._start, self._end = scratch, 0, self._end - self._start
        events.append(Ready(meta))
        return None

    def allow(self, room: int, room_bytes: int = 2**62) -> list[Event]:
        """The reader's queue has room for ``room`` more messages of ``room_bytes`` in all
        (costs as :attr:`Received.cost`): those already read."""
        self.room, self.room_bytes = room, room_bytes
        events: list[Event] = []
        if self.closed is None and self._big is None:
            self._parse(events)
        return events

    # ---- the gate's verdict, and writing ---------------------------------------------
    def accept(self) -> list[Event]:
        """Let the PLAIN peer in (WELCOME); returns events of bytes already buffered."""
        if not self._verdict_due:
            raise RuntimeError("accept() without a pending HELLO")
        self._verdict_due = False
        self._out.append(command(b"WELCOME"))
        events: list[Event] = []
        self._parse(events)
        unfed, self._unfed = self._unfed, b""
        return events + self.feed(unfed) if unfed else events

    def refuse(self, status: bytes = b"400") -> None:
        """Refuse the PLAIN peer: ERROR with a ZAP status (libzmq reports a failed auth)."""
        self._verdict_due = False
        self._out.append(frame_head(len(_ERROR) + 1 + len(status), COMMAND) + _ERROR)
        self._out.append(bytes((len(status),)) + status)
        self.closed = Violation("not_admitted", "the gate refused the connection token")
        self._buf = bytearray()
        self._start = self._end = 0

    @property
    def wants_write(self) -> bool:
        return bool(self._out) or self._pong is not None

    @property
    def unparsed(self) -> int:
        """What is held and not handed over yet: bytes read and not parsed (held back by
        :attr:`room`) and the message in progress, counted as a queued message is (its
        ``_message_bytes`` include a large frame still being read, at its full size)."""
        held = self._end - self._start + self._message_bytes
        return held + FRAME_OVERHEAD * len(self._frames)

    def finish(self) -> None:
        """The peer closed: keep only what can still become a message. A large frame still
        being read never completes now (its bytes only ever went into it), so it goes, with
        the message it belonged to; the read buffer shrinks to the bytes not parsed."""
        if self._big is not None:
            self._big, self._big_at = None, 0
            self._frames, self._message_bytes = [], 0
        if not self._final:
            self._buf = bytearray(self._buf[self._start : self._end])
            self._start, self._end, self._final = 0, len(self._buf), True

    def discard(self) -> None:
        """Forget what was read and not parsed (a closed peer's backlog, dropped)."""
        self._frames, self._big, self._buf = [], None, bytearray()
        self._start = self._end = self._message_bytes = 0
        self.blocked = False  # nothing is held back any more
        if self.closed is None:
            self.closed = Violation("malformed", "closed; its backlog was dropped")

    def data_to_send(self) -> list[Buffer]:
        out, self._out = self._out, []
        if self._pong is not None:
            out.append(self._pong)
            self._pong = None
        return out
