"""What a client of the ops port can hold, and for how long.

The ops port shares the worker's event loop, process and file descriptors with training, and
anyone who reaches it may connect. :class:`GuardedSite` (an aiohttp site) keeps it to:

- at most :data:`MAX_CONNECTIONS` connections at once; the next is answered ``503`` and
  closed as it is accepted, so it holds no descriptor (before, 1,100 idle connections to a
  server whose limit was the common 1,024 descriptors left it unable to accept its client:
  training stopped, and asyncio logged 48,000 tracebacks in 30 s);
- a request's head within :data:`IDLE_S` of the connection or of the previous answer
  (aiohttp's ``keepalive_timeout``, which also ends a connection dribbling its headers:
  before, aiohttp's default held either for an hour);
- an answer the client does not read: its connection is closed once the bytes waiting to go
  to it stayed the same for :data:`STALL_S` (before, such a connection was held for as
  long as the client lived, past the head's deadline: 64 of them closed the port for good);
- the event loop's time: requests are answered at :data:`RATE` a second after a burst of
  :data:`BURST`, a ``/metrics`` scrape (a few ms of rendering) costing :data:`SCRAPE_COST`
  of them, so at most 5 scrapes a second; one over waits its turn, which costs the loop
  nothing (before, four clients scraping every millisecond took ~80 scrapes a second and
  training lost 15-25% of its steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from workers.runtime.quietlog import QuietLog

_LOG = QuietLog(logging.getLogger("sl_pipeline.ops.requests"))
MAX_CONNECTIONS = 64
RATE = 50.0  # requests a second, after BURST
BURST = 100.0
SCRAPE_COST = 10.0  # a /metrics scrape counts as this many requests
IDLE_S = 10.0
STALL_S = 20.0
_WHY = b"the ops port has too many connections\n"
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_WHY), _WHY)
)


class Throttle:
    """Turns at ``rate`` a second after a burst of ``burst``, first come first served: each
    caller is given its time as it asks, and sleeps until then. The callers are the ops
    port's connections (at most :data:`MAX_CONNECTIONS`, one request at a time each), so a
    wait is at most ``MAX_CONNECTIONS * SCRAPE_COST / rate`` seconds."""

    def __init__(
        self, rate: float = RATE, burst: float = BURST, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._at = burst, clock()

    def reserve(self, cost: float = 1.0) -> float:
        """Take ``cost`` turns; the seconds to wait before using them."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - cost
        self._at = now
        return max(0.0, -self._tokens / self.rate)

    async def turn(self, cost: float = 1.0) -> None:
        wait = self.reserve(cost)
        if wait > 0:
            await asyncio.sleep(wait)


class _Refused(asyncio.Protocol):
    """A connection over the cap: told why, and closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site that serves at most ``max_connections`` at once and closes connections
    whose answers are not read; each is counted (``record_bound``: ``ops_connections``,
    ``ops_stalled``) and logged once per interval."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        record_bound: Callable[[str], None] = lambda table: None,
        max_connections: int = MAX_CONNECTIONS,
        stall_s: float = STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(runner)
        self.host, self.port = host, port
        self.max_connections, self.stall_s = max_connections, stall_s
        self._record = record_bound
        self._backlogs: dict[object, tuple[int, float]] = {}  # handler -> (bytes, since)
        self._sweeper: asyncio.Task[None] | None = None
        # handlers made but not yet connected (asyncio calls connection_made a loop turn
        # later: one burst of accepts would pass the cap) -> when made
        self._fresh: dict[object, float] = {}
        self._clock = clock

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        now = self._clock()  # one whose transport failed never connects: forgotten in 1 s
        self._fresh = {h: t for h, t in self._fresh.items() if now - t < 1.0}
        if len(server.connections) + len(self._fresh) >= self.max_connections:
            self._record("ops_connections")
            _LOG.warning(
                "connections",
                "ops port: %d connections open (its cap); refused one",
                len(server.connections) + len(self._fresh),
            )
            return _Refused()
        handler = server()
        self._fresh[handler] = now
        return handler

    def _connected(self, handler: Any, transport: asyncio.Transport) -> None:
        """``Server.connection_made``, which each handler calls as it connects: from here it
        counts among the server's connections, until it is closed and done."""
        self._fresh.pop(handler, None)
        self._made(handler, transport)

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._made = server.connection_made
        server.connection_made = self._connected  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, reuse_address=True
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await super().stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.stall_s / 4)
            self.sweep(asyncio.get_running_loop().time())

    def sweep(self, now: float) -> None:
        """Close each connection whose answer bytes waiting to go out stayed the same, and
        more than none, for ``stall_s`` (one the client reads from drains them, and its
        handler then writes more)."""
        server = self._runner.server
        backlogs: dict[object, tuple[int, float]] = {}
        for handler in server.connections if server is not None else []:
            transport = handler.transport
            waiting = transport.get_write_buffer_size() if transport is not None else 0
            if transport is None or waiting == 0:
                continue
            before, since = self._backlogs.get(handler, (-1, now))
            if waiting != before:
                since = now
            elif now - since >= self.stall_s:
                transport.abort()
                self._record("ops_stalled")
                _LOG.warning(
                    "stalled",
                    "ops port: closed a connection that read nothing for %.0fs",
                    self.stall_s,
                )
                continue
            backlogs[handler] = (waiting, since)
        self._backlogs = backlogs


__all__ = ["IDLE_S", "MAX_CONNECTIONS", "RATE", "SCRAPE_COST", "STALL_S", "GuardedSite", "Throttle"]
