"""The client's connection: :class:`DealerConnection` with a leaner wait for a reply.

A client with one step in flight waits for every reply, so the wait sits on the critical
path of each step. pyzmq's asyncio receive builds a future, an event record, a done
callback and enum flag arithmetic per message, and resolves in one more turn of the event
loop. Here the socket's notification descriptor (a duplicate of ``ZMQ_FD``, registered
with the loop once) wakes one plain future, and the message is then read with a plain
non-blocking receive on the same socket. Everything else (the handshake, the
lost-link watcher, chunked replies, refusals) is :class:`DealerConnection`'s.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import zmq

from sl_pipeline.errors import ReplyTimeoutError
from sl_pipeline.messages import Message
from sl_pipeline.transport import DealerConnection

# Plain ints: pyzmq's flags are enums, and enum operations cost microseconds per message.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class ClientConnection(DealerConnection):
    """One client's link to the next hop, waiting for replies through its own reader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._raw: Any = zmq.Socket.shadow(self.sock.underlying)  # the same socket, plain calls
        self._reader: tuple[asyncio.AbstractEventLoop, int] | None = None  # (loop, dup'd fd)
        self._waiters: set[asyncio.Future[None]] = set()  # woken by the reader or the watcher

    async def send(self, message: Message) -> int:
        try:
            return await super().send(message)
        finally:
            # A send handles the socket's pending commands, and with them the signal of a
            # reply that came meanwhile: the descriptor then stays quiet while the reply is
            # queued, so a wait in another task checks the queue again.
            self._on_readable()

    async def _recv_raw(self, timeout_s: float, what: str) -> list[Any]:
        if self.channel is None:  # the handshake takes the general path
            return await super()._recv_raw(timeout_s, what)
        await self._readable(timeout_s)
        if self._queued():
            return list(self._raw.recv_multipart(_NOBLOCK, copy=False))
        if self._lost_watcher().done():
            return await super()._recv_raw(timeout_s, what)  # raises why the link went
        raise ReplyTimeoutError(
            f"no answer from the {self.peer} at {self.endpoint} within {timeout_s:.3g}s while "
            f"waiting for {what}; the request or its reply may have been lost"
        )

    async def _readable(self, timeout_s: float) -> None:
        """Until a message is queued, the link is lost or ``timeout_s`` has passed."""
        loop = asyncio.get_running_loop()
        self._watch(loop)
        deadline = loop.time() + timeout_s
        lost = self._lost_watcher()

        def on_lost(_: object) -> None:  # one callback object per wait: removed as added
            self._on_readable()

        lost.add_done_callback(on_lost)
        try:
            # ZMQ_FD signals that the state may have changed, not that a message came:
            # check again after every wake-up.
            while not self._queued() and not lost.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.add(waiter)
                timer = loop.call_later(remaining, _wake, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiters.discard(waiter)
        finally:
            lost.remove_done_callback(on_lost)

    def _queued(self) -> bool:
        return bool(self._raw.get(_EVENTS) & _POLLIN)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register a duplicate of the socket's descriptor with ``loop`` (once per loop): the
        original belongs to pyzmq's own reader, which a second ``add_reader`` would replace."""
        if self._reader is not None and self._reader[0] is loop:
            return
        self._unwatch()
        fd = os.dup(self._raw.FD)
        loop.add_reader(fd, self._on_readable)
        self._reader = (loop, fd)

    def _on_readable(self) -> None:
        for waiter in self._waiters:
            _wake(waiter)

    def _unwatch(self) -> None:
        if self._reader is None:
            return
        loop, fd = self._reader
        self._reader = None
        if not loop.is_closed():
            loop.remove_reader(fd)
        os.close(fd)

    def close(self, linger_ms: int = 0) -> None:
        self._unwatch()  # before the socket (and its descriptor) goes
        super().close(linger_ms)  # which drops the session, and a chunked reply half in


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
