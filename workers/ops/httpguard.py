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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

MAX_CONNECTIONS = 64
IDLE_S = 10.0
_WHY = b"the ops port has too many connections\n"
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_WHY), _WHY)
)


class _Refused(asyncio.Protocol):
    """A connection over the cap: told why, and closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site that serves at most ``max_connections`` at once; ``on_refused`` is called
    for each connection over the cap."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        on_refused: Callable[[], None] = lambda: None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(runner)
        self.host, self.port = host, port
        self.max_connections, self._on_refused = max_connections, on_refused
        # handlers made but maybe not yet connected (asyncio calls connection_made a loop
        # turn later: one burst of accepts would pass the cap) -> when made
        self._fresh: dict[object, float] = {}

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        live, now = set(server.connections), time.monotonic()
        self._fresh = {h: t for h, t in self._fresh.items() if h not in live and now - t < 1.0}
        if len(live) + len(self._fresh) >= self.max_connections:
            self._on_refused()
            return _Refused()
        handler = server()
        self._fresh[handler] = now
        return handler

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, reuse_address=True
        )


__all__ = ["IDLE_S", "MAX_CONNECTIONS", "GuardedSite"]
