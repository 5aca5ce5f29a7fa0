"""Taking the ops port's connections off its listening sockets ourselves: one that its
address's rate refuses costs an ``accept``, a short ``send`` and a ``close``, never an
asyncio transport (asyncio's own accept makes a transport, a task and a protocol for each
connection before anyone can look at its address: 0.19 ms of the loop per connection here,
refused or not). The others are handed to asyncio as its own accept would hand them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from workers.runtime.quietlog import QuietLog

_LOG = QuietLog(logging.getLogger("sl_pipeline.ops.requests"))
BACKLOG = 100  # connections the kernel holds until accepted (asyncio's default)
ACCEPTS_PER_TURN = BACKLOG  # connections taken per wake-up, as asyncio's accept loop does
RETRY_S = 1.0  # out of descriptors: accepting pauses this long, as asyncio's does
_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Accepts on each listening socket of ``server`` (created with ``start_serving=False``):
    a connection ``allow`` refuses is sent ``refusal``, closed and counted (``refused``);
    the others get a transport and ``protocol()``."""

    def __init__(
        self,
        server: asyncio.Server,
        allow: Callable[[str], bool],
        refused: Callable[[], None],
        protocol: Callable[[], asyncio.BaseProtocol],
        refusal: bytes,
    ) -> None:
        self._server, self._allow, self._refused = server, allow, refused
        self._protocol, self._refusal = protocol, refusal
        self._listeners: list[socket.socket] = []
        self._handing: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        for listening in self._server.sockets:  # a duplicate descriptor: asyncio keeps its own
            listener = socket.fromfd(listening.fileno(), listening.family, listening.type)
            listener.setblocking(False)
            listener.listen(BACKLOG)  # asyncio listens only once it serves, which it never does
            self._listeners.append(listener)
            self._loop.add_reader(listener.fileno(), self._ready, listener)

    def stop(self) -> None:
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []

    def _ready(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _SHORT:
                    raise
                self._pause(listener, exc)
                return
            if self._allow(str(address[0]) if address else ""):
                conn.setblocking(False)
                task = self._loop.create_task(self._hand_over(conn))
                self._handing.add(task)
                task.add_done_callback(self._handing.discard)
            else:
                self._refused()
                _refuse(conn, self._refusal)

    def _pause(self, listener: socket.socket, exc: OSError) -> None:
        _LOG.warning("accept", "ops port: cannot accept (%s); pausing %.0fs", exc, RETRY_S)
        self._loop.remove_reader(listener.fileno())

        def resume() -> None:
            if listener in self._listeners:
                self._loop.add_reader(listener.fileno(), self._ready, listener)

        self._loop.call_later(RETRY_S, resume)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, conn)
        except OSError:  # gone before its transport was made
            conn.close()


def _refuse(conn: socket.socket, refusal: bytes) -> None:
    """Say why and close; what the client sent already is read first, so the close is a
    FIN after the answer, not a reset that could drop it."""
    with conn, contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(refusal)
        conn.recv(65536)


__all__ = ["Acceptor"]
