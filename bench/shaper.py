"""A WAN link on loopback: a TCP proxy with a one-way delay and a rate limit.

Each direction is a bottleneck link followed by a propagation delay: a chunk read from one
side leaves the link once the link has sent everything before it at ``rate_bit_s``, and is
written to the other side ``delay_s`` later (so the round trip adds ``2 * delay_s``). The
settings live in shared memory (:class:`LinkSettings`) and apply to every chunk read after a
change, so one proxy serves several settings in turn; it also counts the bytes it carried
each way. It runs in a child process (``serve``), so its timers do not share the client's
event loop.

Each direction is a pair of threads (one reads and stamps each chunk with its due time, one
sleeps until then and writes it), not asyncio tasks: an event loop wakes its timers on
epoll's millisecond ticks, rounded up, which added 1.4 ms (median; 4 ms at the 90th
percentile) to a 40 ms round trip and 0.9 ms to each direction of a 33 KB step;
``time.sleep`` wakes within tens of microseconds.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

from .common import CTX, LOOPBACK

READ_BYTES = 64 * 1024
POLL_S = 0.1
JOIN_S = 5.0


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


def _deliver(
    chunks: queue.SimpleQueue[tuple[float, bytes] | None], dst: socket.socket, src: socket.socket
) -> None:
    try:
        while (item := chunks.get()) is not None:
            due, data = item
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            dst.sendall(data)
    except OSError:  # the far side went: end the read side too, or it queues for ever
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RDWR)


def _direction(
    src: socket.socket, dst: socket.socket, settings: LinkSettings, counter: Synchronized[int]
) -> None:
    """Carry ``src``'s bytes to ``dst`` through the link until either side closes."""
    chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
    sender = threading.Thread(target=_deliver, args=(chunks, dst, src), daemon=True)
    sender.start()
    link_free = 0.0  # when the bottleneck has sent everything queued so far
    with contextlib.suppress(OSError):
        while data := src.recv(READ_BYTES):
            rate = settings.rate_bit_s.value
            now = time.monotonic()
            link_free = max(link_free, now) + (len(data) * 8 / rate if rate > 0 else 0.0)
            chunks.put((link_free + settings.delay_s.value, data))
            counter.value += len(data)
    chunks.put(None)
    sender.join(JOIN_S)
    for sock in (dst, src):  # the other direction's read ends too
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _connect(client: socket.socket, target: str, settings: LinkSettings) -> list[threading.Thread]:
    host, port = target.rsplit(":", 1)
    try:
        upstream = socket.create_connection((host, int(port)))
    except OSError:
        client.close()
        return []
    pumps = []
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for src, dst, counter in ((client, upstream, settings.up), (upstream, client, settings.down)):
        pump = threading.Thread(target=_direction, args=(src, dst, settings, counter), daemon=True)
        pump.start()
        pumps.append(pump)
    closer = threading.Thread(target=_close_after, args=(pumps, (client, upstream)), daemon=True)
    closer.start()
    return [*pumps, closer]


def _close_after(pumps: list[threading.Thread], socks: tuple[socket.socket, ...]) -> None:
    """Close a connection's two sockets once both directions are done with them."""
    for pump in pumps:
        pump.join()
    for sock in socks:
        sock.close()


def serve(port: int, target: str, settings: LinkSettings, ready: Queue, stop: Event) -> None:
    """Proxy ``127.0.0.1:port`` to ``target`` (``host:port``) until ``stop`` is set."""
    listener = socket.create_server((LOOPBACK, port))
    listener.settimeout(POLL_S)
    pumps: list[threading.Thread] = []
    ready.put("shaper")
    try:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            pumps += _connect(client, target, settings)
    finally:
        listener.close()
