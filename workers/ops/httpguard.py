"""What a client of the ops port can hold, and for how long.

The ops port shares the worker's event loop, process and file descriptors with training, and
anyone who reaches it may connect. :class:`GuardedSite` (an aiohttp site) keeps it to:

- from one address (an IPv6 address's /64), at most :data:`NEW_PER_S` new connections a
  second after a burst of :data:`NEW_BURST`; one over is answered ``503`` and closed as it
  is accepted, before asyncio makes a transport for it (``sl_pipeline.zmtp_accept``; before,
  a client opening and closing connections as fast as it could, 262 a second here, had each
  served);
- at most :data:`MAX_CONNECTIONS` connections at once, :data:`MAX_PER_ADDRESS` of them from
  one address (before, one address holding 64 idle ones, re-opened as the server closed
  them, kept Prometheus out); the next is answered ``503`` and closed as it is accepted, so
  it holds no descriptor (before, 1,100 idle connections to a
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
  training lost 15-25% of its steps); one whose client left while it waited gives its turn
  back, within :data:`POLL_S` (before, Prometheus waited 3.2 s behind 16 such).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from sl_pipeline.zmtp_accept import BACKLOG, Acceptor
from workers.runtime.quietlog import QuietLog

_LOG = QuietLog(logging.getLogger("sl_pipeline.ops.requests"))
MAX_CONNECTIONS = 64
MAX_PER_ADDRESS = 16  # of them from one address (an IPv6 /64): one host cannot take them all
RATE = 50.0  # requests a second, after BURST
BURST = 100.0
SCRAPE_COST = 10.0  # a /metrics scrape counts as this many requests
IDLE_S = 10.0
POLL_S = 0.1  # how often a request waiting for its turn looks whether its client left
STALL_S = 20.0
# New connections one address may open: a scrape a second, health checks and `sl-pipeline
# runs` from one host, or a test polling /readyz every 50 ms, stay well under it.
NEW_PER_S = 20.0
NEW_BURST = 40.0
SOURCES = 1024  # addresses whose new connections are counted at once


def _refusal(why: bytes) -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(why), why)
    )


REFUSAL = _refusal(b"the ops port has too many connections\n")
CROWDED = _refusal(b"the ops port has too many connections from this address\n")
TOO_FAST = _refusal(b"too many new connections from this address; try again in a second\n")


class _Ticket:
    """A caller waiting for its turn: when it comes (on the throttle's clock), and its cost."""

    __slots__ = ("cost", "due")

    def __init__(self, due: float, cost: float) -> None:
        self.due, self.cost = due, cost


def _never() -> bool:
    return False


class Throttle:
    """Turns at ``rate`` a second after a burst of ``burst``, first come first served: each
    caller is given its time as it asks, and sleeps until then. The callers are the ops
    port's connections (at most :data:`MAX_CONNECTIONS`, one request at a time each), so a
    wait is at most ``MAX_CONNECTIONS * SCRAPE_COST / rate`` seconds. A caller whose client
    left while it waited (``gone``, looked at every :data:`POLL_S`) gives its turn back, and
    everyone behind it moves up: before, a closed connection's request still took its turn,
    and Prometheus waited 3.2 s behind 16 of them (the ops review's run)."""

    def __init__(
        self,
        rate: float = RATE,
        burst: float = BURST,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = POLL_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate, self.burst, self.clock, self.poll_s = rate, burst, clock, poll_s
        self.sleep = sleep
        self._tokens, self._at = burst, clock()
        self.waiting: list[_Ticket] = []  # first come first

    def reserve(self, cost: float = 1.0) -> float:
        """Take ``cost`` turns; the seconds to wait before using them."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - cost
        self._at = now
        return max(0.0, -self._tokens / self.rate)

    async def turn(self, cost: float = 1.0, gone: Callable[[], bool] = _never) -> bool:
        """Wait for a turn: True once it came, False if ``gone`` first (the turn given back)."""
        wait = self.reserve(cost)
        if wait <= 0:
            return True
        ticket = _Ticket(self.clock() + wait, cost)
        self.waiting.append(ticket)
        try:
            while (left := ticket.due - self.clock()) > 0:
                if gone():
                    self._give_back(ticket)
                    return False
                await self.sleep(min(left, self.poll_s))
            return True
        finally:
            if ticket in self.waiting:
                self.waiting.remove(ticket)

    def _give_back(self, ticket: _Ticket) -> None:
        """``ticket``'s turns return to the bucket, and each later ticket comes that much
        sooner (their order stays)."""
        place = self.waiting.index(ticket)
        for later in self.waiting[place + 1 :]:
            later.due -= ticket.cost / self.rate
        self._tokens += ticket.cost
        del self.waiting[place]


class AcceptRate:
    """New connections per source address: ``rate`` a second after a burst of ``burst``.
    An IPv6 address counts as its /64 (one host holds all of it). At most ``sources``
    addresses are counted at once; one whose bucket refilled is forgotten, and while every
    place holds one that did not, the address seen least recently is: a new address is
    never refused for the table's size (refusing it let a stranger keeping 1,024 addresses
    busy lock Prometheus and the CLI out). A stranger cycling through more addresses than
    that escapes the rate, as one with 1,024 got 20,480 connections a second anyway: the
    rate holds a host to its share, the connection cap and the descriptors bound the rest."""

    def __init__(
        self,
        rate: float = NEW_PER_S,
        burst: float = NEW_BURST,
        sources: int = SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.sources, self.clock = rate, burst, sources, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at), oldest first

    def allow(self, address: str) -> bool:
        """Whether ``address`` may open one more connection now (it takes a token)."""
        now, source = self.clock(), _source(address)
        tokens, at = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        self._forget_refilled(now)
        if len(self._buckets) >= self.sources:  # the address seen least recently goes
            del self._buckets[next(iter(self._buckets))]
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)  # now the newest
        return allowed

    def _forget_refilled(self, now: float) -> None:
        refill_s = self.burst / self.rate
        while self._buckets:
            source, (_, at) = next(iter(self._buckets.items()))
            if now - at < refill_s:
                return
            del self._buckets[source]


def _source(address: str) -> str:
    """What one host holds: an IPv4 address (also written as ``::ffff:a.b.c.d``), an IPv6
    address's /64, or a link-local IPv6 address itself (every host on a link has its
    address in the one fe80::/64: as a /64, one host spent the rate of all of them)."""
    if ":" not in address:
        return address
    with contextlib.suppress(ValueError):
        ip = ipaddress.IPv6Address(address.partition("%")[0])
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return address if ip.is_link_local else str(ipaddress.IPv6Network(f"{ip}/64", False))
    return address


def _peer_source(transport: asyncio.BaseTransport | None) -> str | None:
    """The source (``_source``) a connection came from; None once it has no transport."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    return _source(str(peer[0])) if peer else None


class _Refused(asyncio.Protocol):
    """A connection refused as it connects: told why, and closed at once."""

    def __init__(self, why: bytes = REFUSAL) -> None:
        self.why = why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport, though not an asyncio class on every loop (uvloop's are its own)
        stream = cast(asyncio.Transport, transport)
        stream.write(self.why)
        stream.close()


class _Gate(asyncio.Protocol):
    """A connection just accepted: ``admit`` picks the protocol that serves it (aiohttp's
    handler, or a refusal), which takes the transport over from here."""

    def __init__(self, admit: Callable[[asyncio.Transport], asyncio.Protocol]) -> None:
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # see _Refused.connection_made
        protocol = self._admit(stream)
        stream.set_protocol(protocol)
        protocol.connection_made(stream)


class GuardedSite(web.BaseSite):
    """A TCP site that takes new connections from one address at the rate of ``accepts``,
    serves at most ``max_connections`` at once and closes connections whose answers are
    not read; each is counted (``record_bound``: ``ops_new_connections``,
    ``ops_connections``, ``ops_stalled``) and logged once per interval."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        record_bound: Callable[[str], None] = lambda table: None,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int = MAX_PER_ADDRESS,
        stall_s: float = STALL_S,
        accepts: AcceptRate | None = None,
    ) -> None:
        super().__init__(runner)
        self.host, self.port = host, port
        self.max_connections, self.stall_s = max_connections, stall_s
        self.max_per_address = max_per_address
        self.accepts = accepts or AcceptRate()
        self._record = record_bound
        self._backlogs: dict[object, tuple[int, float]] = {}  # handler -> (bytes, since)
        # handler -> its source, as admitted: a closed one's waiting request keeps its place
        # in server.connections with no transport to name its address any more
        self._sources: dict[object, str | None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._acceptor: Acceptor | None = None

    @property
    def name(self) -> str:
        """Where the site listens, as a URL (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _admit(self, transport: asyncio.Transport) -> asyncio.Protocol:
        """The protocol for a connection its address's rate let through, as it connects
        (the count of the server's connections is exact then: each handler joins it as it
        connects)."""
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self.max_connections:
            self._record("ops_connections")
            _LOG.warning(
                "connections",
                "ops port: %d connections open (its cap); refused one",
                len(server.connections),
            )
            return _Refused()
        source = _peer_source(transport)
        self._sources = {h: self._sources.get(h) for h in server.connections}  # gone: forgotten
        # (no source: reset before it was accepted, and closed at once whatever is answered)
        held = sum(1 for s in self._sources.values() if s == source) if source else 0
        if held >= self.max_per_address:
            self._record("ops_connections")
            _LOG.warning(
                "crowded",
                "ops port: %d connections open from one address (its cap); refused one",
                held,
            )
            return _Refused(CROWDED)
        handler = server()
        self._sources[handler] = source
        return handler  # type: ignore[no-any-return]

    def _refuse_too_fast(self, conn: socket.socket) -> None:
        """Counted, told why and closed: an ``accept``, a ``send`` and a ``close``, never an
        asyncio transport (0.19 ms of the loop per connection here, refused or not)."""
        self._record("ops_new_connections")
        _LOG.warning("accepts", "ops port: too many new connections from one address")
        with conn, contextlib.suppress(OSError):
            # what the client sent is read first, so the close is a FIN after the answer,
            # not a reset that could drop it
            conn.setblocking(False)
            conn.send(TOO_FAST)
            conn.recv(65536)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        gate = lambda: _Gate(self._admit)  # noqa: E731
        self._server = await loop.create_server(
            gate, self.host, self.port, reuse_address=True, start_serving=False
        )
        self._acceptor = Acceptor(
            self._server,
            lambda address: gate() if self.accepts.allow(address) else None,
            self._refuse_too_fast,
            per_turn=BACKLOG,  # as asyncio's accept loop: each costs the loop little here
        )
        self._acceptor.start()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop()
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


__all__ = [
    "IDLE_S",
    "MAX_CONNECTIONS",
    "MAX_PER_ADDRESS",
    "NEW_BURST",
    "NEW_PER_S",
    "RATE",
    "SCRAPE_COST",
    "STALL_S",
    "AcceptRate",
    "GuardedSite",
    "Throttle",
]
