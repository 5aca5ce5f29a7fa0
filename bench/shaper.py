"""A WAN link on loopback: an asyncio TCP proxy with a one-way delay and a rate limit.

Each direction is a bottleneck link followed by a propagation delay: a chunk read from one
side leaves the link once the link has sent everything before it at ``rate_bit_s``, and is
written to the other side ``delay_s`` later (so the round trip adds ``2 * delay_s``). The
settings live in shared memory (:class:`LinkSettings`) and apply to every chunk read after a
change, so one proxy serves several settings in turn; it also counts the bytes it carried
each way. It runs in a child process (``serve``), so its timers do not share the client's
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

from .common import CTX, LOOPBACK

READ_BYTES = 64 * 1024
POLL_S = 0.1


class LinkSettings:
    """One-way delay, rate (0: unlimited) and byte counters, shared with the proxy process."""

    def __init__(self) -> None:
        self.delay_s: Synchronized[float] = CTX.Value("d", 0.0)  # type: ignore[assignment]
        self.rate_bit_s: Synchronized[float] = CTX.Value("d", 0.0)  # type: ignore[assignment]
        self.up: Synchronized[int] = CTX.Value("q", 0)  # type: ignore[assignment]
        self.down: Synchronized[int] = CTX.Value("q", 0)  # type: ignore[assignment]

    def set(self, rtt_s: float, rate_bit_s: float) -> None:
        self.delay_s.value = rtt_s / 2
        self.rate_bit_s.value = rate_bit_s

    def carried(self) -> tuple[int, int]:
        """Bytes carried so far: (client to server, server to client)."""
        return self.up.value, self.down.value


async def _link(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    settings: LinkSettings,
    counter: Synchronized[int],
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    link_free = 0.0  # when the bottleneck has sent everything queued so far
    try:
        while data := await reader.read(READ_BYTES):
            rate = settings.rate_bit_s.value
            now = loop.time()
            link_free = max(link_free, now) + (len(data) * 8 / rate if rate > 0 else 0.0)
            queue.put_nowait((link_free + settings.delay_s.value, data))
            counter.value += len(data)
        queue.put_nowait(None)
        await sender
    finally:
        sender.cancel()
        writer.close()


async def _proxy(port: int, target: str, settings: LinkSettings, ready: Queue, stop: Event) -> None:
    host, target_port = target.rsplit(":", 1)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
        except OSError:
            writer.close()
            return
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(
                _link(reader, up_writer, settings, settings.up),
                _link(up_reader, writer, settings, settings.down),
            )

    server = await asyncio.start_server(connection, LOOPBACK, port)
    ready.put("shaper")
    async with server:
        while not stop.is_set():
            await asyncio.sleep(POLL_S)


def serve(port: int, target: str, settings: LinkSettings, ready: Queue, stop: Event) -> None:
    """Proxy ``127.0.0.1:port`` to ``target`` (``host:port``) until ``stop`` is set."""
    asyncio.run(_proxy(port, target, settings, ready, stop))
