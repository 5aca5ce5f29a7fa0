"""Thin asyncio/ZeroMQ adapters over the sans-IO core (codec, crypto session, handshake).

A :class:`Channel` turns messages into sealed frames for one authenticated peer and back.
:class:`DealerConnection` is the client end (one server); the server end (many clients)
reads ZMTP itself: :mod:`sl_pipeline.zmtp_router`. Large frames go out with ``copy=False``;
each sealed buffer is freshly allocated, so nothing is reused while ZeroMQ still holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .codec import DEFAULT_LIMITS, Limits, decode, encode
from .errors import PeerError, ProtocolError, ReplyTimeoutError, TransportError
from .gate import MAX_CONNECTIONS_PER_KEY, USERNAME, ZAP_TOO_MANY
from .handshake import AnySession, Buffer, ClientHandshake, is_handshake, refused
from .messages import Kind, Message
from .zmtp import max_frame_bytes  # libzmq's MAXMSGSIZE on every socket here

log = logging.getLogger("sl_pipeline.transport")

OnMessage = Callable[[str, str, int], None]  # (direction, kind, nbytes)
COPY_THRESHOLD = 64 * 1024
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000
HANDSHAKE_IVL_MS = 15_000
# What a DEALER's monitor reports: a dropped link, or ZeroMQ's own handshake refused.
_WATCHED = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
# Plain ints: pyzmq's flags are enums, and an enum operation costs a microsecond per message.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def _noop(direction: str, kind: str, nbytes: int) -> None:
    return None


def frames_size(frames: Sequence[Any]) -> int:
    return sum(memoryview(f.buffer if isinstance(f, zmq.Frame) else f).nbytes for f in frames)


def frame_buffers(frames: Sequence[Any]) -> list[Buffer]:
    return [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]


class Channel:
    """Seal/open messages for one peer. Pure: no sockets."""

    def __init__(self, session: AnySession, limits: Limits = DEFAULT_LIMITS) -> None:
        self.session = session
        self.limits = limits
        self._max_bytes = limits.max_message_bytes + limits.max_header_bytes

    def pack(self, message: Message) -> list[Buffer]:
        """``message`` as one ZeroMQ message, never chunked: for small notices only (a frame
        over the chunk size is dropped by the receiver's ``MAXMSGSIZE``)."""
        return list(self.session.seal(encode(message)))

    def parts(self, message: Message) -> Iterator[Sequence[Buffer]]:
        """``message`` as the ZeroMQ messages to send in order: one, or a chunked sequence
        sealed lazily (send each part as it comes, so sealing overlaps sending)."""
        return self.session.seal_parts(encode(message))

    def feed(self, frames: Sequence[Buffer]) -> Message | None:
        """One received ZeroMQ message: the decoded message once complete, else ``None``."""
        buffers = self.session.feed(frames, self._max_bytes)
        return None if buffers is None else decode(buffers, self.limits)

    def unpack(self, frames: Sequence[Buffer]) -> Message:
        """A message that arrived as one ZeroMQ message (a chunk part is refused)."""
        return decode(self.session.open(frames), self.limits)


# Messages a client's (or relay's) link queues unread: 16 of at most limits.max_frames
# chunks each, 512 MiB, what one reply may be anyway (1000 held a hostile server's 32 GiB).
DEALER_RCVHWM = 16


def new_socket(ctx: zmq.asyncio.Context, kind: int, limits: Limits, hwm: int = 1000) -> Any:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(limits))
    # A connection that has not finished ZeroMQ's handshake (the gate included) is dropped
    # after this long: a stranger cannot hold a half-open connection and its buffer.
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # ZMTP heartbeats: a peer that stops answering PINGs is disconnected after the timeout,
    # which a waiting client sees at once through its monitor socket.
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.copy_threshold = COPY_THRESHOLD
    return sock


class DealerConnection:
    """Client end of one server link: handshake, then request/response messages."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        limits: Limits = DEFAULT_LIMITS,
        on_message: OnMessage = _noop,
        peer: str = "server",
    ) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.on_message = on_message
        self.peer = peer  # what the other end is ("server", "relay"), for messages
        self.sock = new_socket(ctx, zmq.DEALER, limits)
        # What the peer may push unasked while we compute: libzmq reads on into this queue;
        # past it, reading pauses and TCP holds the peer back.
        self.sock.setsockopt(zmq.RCVHWM, DEALER_RCVHWM)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.monitor = self.sock.get_monitor_socket(_WATCHED)
        self.channel: Channel | None = None
        self._send_lock = asyncio.Lock()  # a chunked message's parts go out back to back
        self._lost: asyncio.Future[Any] | None = None
        self._connected = False

    def _connect(self, hs: ClientHandshake) -> None:
        """Connect once, with a gate token when the server is keyed (see sl_pipeline.gate)."""
        if self._connected:
            return
        token = hs.connect_token(time.time())
        if token is not None:
            self.sock.plain_username = USERNAME
            self.sock.plain_password = token
        self.sock.connect(self.endpoint)
        self._connected = True

    async def handshake(self, hs: ClientHandshake, timeout_s: float) -> dict[str, Any]:
        """Join the server; PeerError if refused, TransportError if nobody answers."""
        self._connect(hs)
        # Bounded too, and beside the monitor: when the far end is not ZeroMQ (an HTTP port,
        # say) or refuses us during ZMTP's handshake, libzmq can drop the pipe, and a send
        # with no pipe waits for ever; a refusal is reported as such.
        sending = asyncio.ensure_future(self.sock.send_multipart(hs.start()))
        lost = self._lost_watcher()
        await asyncio.wait({sending, lost}, timeout=timeout_s, return_when="FIRST_COMPLETED")
        if not sending.done():
            sending.cancel()
            if lost.done():
                self._raise_lost(lost, "a handshake answer")
            raise ReplyTimeoutError(
                f"could not send a hello to the {self.peer} at {self.endpoint} within "
                f"{timeout_s:.3g}s; is the {self.peer} running and the address right?"
            )
        sending.result()
        frames = await self._recv_raw(timeout_s, "a handshake answer")
        session, welcome = hs.finish(frame_buffers(frames))
        self.channel = Channel(session, self.limits)
        return welcome

    async def send(self, message: Message) -> int:
        if self.channel is None:
            raise ProtocolError("send before handshake")
        nbytes = await send_parts(self.sock, self._send_lock, [], self.channel.parts(message))
        self.on_message("sent", message.kind.value, nbytes)
        return nbytes

    async def recv(self, timeout_s: float) -> Message:
        """The next message; a refusal or ERROR reply becomes a PeerError."""
        if self.channel is None:
            raise ProtocolError("recv before handshake")
        deadline = time.monotonic() + timeout_s
        nbytes = 0
        message: Message | None = None
        while message is None:  # the parts of a chunked message
            if self.sock.get(_EVENTS) & _POLLIN:  # already queued: no timer, no watcher
                frames = list(await self.sock.recv_multipart(copy=False))
            else:
                frames = await self._recv_part(deadline, timeout_s, nbytes)
            nbytes += frames_size(frames)
            message = self._open(frame_buffers(frames))
        self.on_message("received", message.kind.value, nbytes)
        if message.kind is Kind.ERROR:
            raise PeerError(
                str(message.meta.get("code", "error")),
                str(message.meta.get("reason", "")),
                retryable=message.meta.get("retryable") is True,
            )
        return message

    async def _recv_part(self, deadline: float, timeout_s: float, nbytes: int) -> list[Any]:
        """The next part of a reply by ``deadline``: one wait of ``timeout_s`` covers all the
        parts of a chunked one, and a rest that comes too slowly is said to be one."""
        try:
            return await self._recv_raw(max(0.0, deadline - time.monotonic()), "a reply")
        except ReplyTimeoutError:
            if not nbytes:
                raise
        raise ReplyTimeoutError(
            f"the {self.peer} at {self.endpoint} sent {nbytes} bytes of a chunked reply but "
            f"not the rest within {timeout_s:.3g}s; the reply or its rest may have been lost"
        )

    def _open(self, buffers: list[Buffer]) -> Message | None:
        assert self.channel is not None
        if is_handshake(buffers):
            # A plaintext refusal after joining: the peer dropped our session (it restarted,
            # or refused a message: a counter gap, a failed tag). Rejoining starts afresh.
            error = refused(buffers)
            code = error.remote_code if error is not None else "unauthenticated"
            reason = error.reason if error is not None else "no reason given"
            raise PeerError(
                code,
                f"the {self.peer} at {self.endpoint} refused our message and dropped this "
                f"session: {reason}",
                retryable=True,
            )
        return self.channel.feed(buffers)

    async def _recv_raw(self, timeout_s: float, what: str) -> list[Any]:
        """The next multipart message; TransportError on timeout or a dropped connection
        (a dead server is noticed at once, not after the whole timeout).

        One watcher on the monitor socket lives across calls, and the receive future is
        cancelled by callbacks: no tasks or ``asyncio.wait`` per message on the hot path.
        """
        lost = self._lost_watcher()
        if lost.done():
            if self.sock.get(_EVENTS) & _POLLIN:  # what arrived before the link went
                return list(await self.sock.recv_multipart(copy=False))  # (a shutdown notice)
            self._raise_lost(lost, what)
        received = self.sock.recv_multipart(copy=False)
        why: list[str] = []

        def give_up(reason: str) -> None:
            if not received.done():
                why.append(reason)
                received.cancel()

        def on_lost(_: object) -> None:
            give_up("lost")

        timer = asyncio.get_running_loop().call_later(timeout_s, give_up, "timeout")
        lost.add_done_callback(on_lost)
        try:
            return list(await received)
        except asyncio.CancelledError:
            if not why:
                raise  # our caller was cancelled
        finally:
            timer.cancel()
            lost.remove_done_callback(on_lost)
        if why[0] == "lost":
            self._raise_lost(lost, what)
        hint = (
            "the request or its reply may have been lost"
            if self.channel is not None
            else f"is the {self.peer} running and the address right?"
        )
        raise ReplyTimeoutError(
            f"no answer from the {self.peer} at {self.endpoint} within {timeout_s:.3g}s while "
            f"waiting for {what}; {hint}"
        )

    def _raise_lost(self, lost: asyncio.Future[Any], what: str) -> None:
        """The link went: a refusal during ZeroMQ's handshake says why; a drop is retryable."""
        self._lost = None
        event, value = 0, 0
        if not lost.cancelled():
            info = parse_monitor_message(lost.result())
            event, value = info["event"], info["value"]
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == ZAP_TOO_MANY:
            raise PeerError(
                "overloaded",
                f"the {self.peer} at {self.endpoint} refused the connection: our key holds "
                f"{MAX_CONNECTIONS_PER_KEY} connections there already, the most one key may; "
                "stop the other clients that use this key, or retry once they are gone",
                retryable=True,
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise PeerError(
                "not_admitted",
                f"the {self.peer} at {self.endpoint} refused the connection: our key is not "
                "admitted there (or the two clocks differ by more than 10 minutes)",
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            raise PeerError(
                "crypto",
                f"the {self.peer} at {self.endpoint} refused the connection: one side runs "
                "--insecure and the other does not; run both with keys, or both with --insecure",
            )
        raise TransportError(
            f"connection to the {self.peer} at {self.endpoint} lost while waiting for {what}"
        )

    def _lost_watcher(self) -> asyncio.Future[Any]:
        """A future that completes when the monitor reports a disconnect."""
        if self._lost is None:
            self._lost = asyncio.ensure_future(self.monitor.recv_multipart())
        return self._lost

    def close(self, linger_ms: int = 0) -> None:
        if self._lost is not None:
            self._lost.cancel()
            self._lost = None
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
        # The session goes with the link, and with it the buffers of a chunked reply whose
        # rest never came (up to limits.max_message_bytes): an exception raised out of recv
        # keeps this connection for as long as it is kept, which must not keep them too.
        self.channel = None


async def send_parts(
    sock: Any, lock: asyncio.Lock, prefix: list[bytes], parts: Iterable[Sequence[Buffer]]
) -> int:
    """Send each part as soon as it is sealed: ZeroMQ's I/O thread writes part k to the
    network while this thread seals part k+1. Returns the bytes sent."""
    nbytes = 0
    async with lock:
        for frames in parts:
            await sock.send_multipart([*prefix, *frames], copy=False)
            nbytes += frames_size(frames)
    return nbytes
