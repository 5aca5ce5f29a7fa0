"""Taking a listener's connections off its socket ourselves, a few at a time.

asyncio's own accept takes up to 100 connections per wake-up and makes a transport for
each before anyone can look at its address, so a flood of strangers held that many
descriptors more than any bound on them (:mod:`sl_pipeline.zmtp_pending`) allowed, and a
worker out of descriptors could neither accept its clients nor open a file. Here each
connection is decided as it is accepted: one its address may not open is closed at once,
the others are handed to asyncio (``connect_accepted_socket``) with their protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("sl_pipeline.zmtp")
BACKLOG = 100  # connections the kernel holds until accepted (asyncio's default)
ACCEPTS_PER_TURN = 16  # connections taken per wake-up; the rest wait in the kernel's queue
RETRY_S = 1.0  # out of descriptors: accepting pauses this long, as asyncio's does
_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# address -> the connection's protocol, or None: refuse it (close it at once, by default)
Admit = Callable[[str], asyncio.BaseProtocol | None]
Refuse = Callable[[socket.socket], None]


class Acceptor:
    """Accepts on each listening socket of ``server`` (made with ``start_serving=False``),
    ``per_turn`` connections per wake-up; one ``admit`` gives no protocol goes to ``refuse``
    (which closes it), never to asyncio. The workers' ZMTP listeners and their ops ports
    (``workers.ops.httpguard``) both take their connections this way."""

    def __init__(
        self,
        server: asyncio.Server,
        admit: Admit,
        refuse: Refuse = socket.socket.close,
        per_turn: int = ACCEPTS_PER_TURN,
    ) -> None:
        self._server, self._admit, self._refuse, self._per_turn = server, admit, refuse, per_turn
        self._listeners: list[socket.socket] = []
        self._handing: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        for listening in self._server.sockets:  # a duplicate descriptor: asyncio keeps its own
            family, kind, proto = listening.family, listening.type, listening.proto
            listener = socket.fromfd(listening.fileno(), family, kind, proto)
            listener.setblocking(False)
            listener.listen(BACKLOG)  # asyncio listens only once it serves, which it never does
            self._listeners.append(listener)
            self._loop.add_reader(listener.fileno(), self._ready, listener)

    def stop(self) -> None:
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []
        for task in self._handing:
            task.cancel()

    def _ready(self, listener: socket.socket) -> None:
        for _ in range(self._per_turn):
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _SHORT:
                    raise
                self._pause(listener, exc)
                return
            try:
                protocol = self._admit(str(address[0]) if address else "?")
            except Exception:  # a bug must not leak the descriptor, nor stop accepting
                log.exception("could not admit a connection from %s", address)
                protocol = None
            if protocol is None:
                self._refuse(conn)
                continue
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # asyncio's own accept sets it, and uvloop's transports do; a socket accepted
                # here reached plain asyncio without it: Nagle held each reply's last small
                # write for the peer's delayed ACK, 40 ms a step (digits 33x slower than
                # central under SL_EVENT_LOOP=asyncio, 1.8x under uvloop)
                with contextlib.suppress(OSError):  # macOS: EINVAL once the peer shut down
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._hand_over(conn, protocol))
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    def _pause(self, listener: socket.socket, exc: OSError) -> None:
        log.warning("cannot accept a connection (%s); pausing %.0fs", exc, RETRY_S)
        self._loop.remove_reader(listener.fileno())

        def resume() -> None:
            if listener in self._listeners:
                self._loop.add_reader(listener.fileno(), self._ready, listener)

        self._loop.call_later(RETRY_S, resume)

    async def _hand_over(self, conn: socket.socket, protocol: asyncio.BaseProtocol) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except (OSError, asyncio.CancelledError):  # gone before its transport was made
            conn.close()
            protocol.connection_lost(None)
