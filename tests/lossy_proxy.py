"""A message-level fault-injection proxy for ZeroMQ multipart traffic (tests only).

Clients (DEALER) connect to :attr:`LossyProxy.endpoint`, a ROUTER on a free loopback port;
for each client identity the proxy opens its own DEALER to the upstream server, so the
server still sees distinct peers. Whole multipart messages are forwarded both ways, each
dropped with probability ``drop_rate`` (never a partial message: ZeroMQ delivers
multipart messages atomically and the proxy forwards the frame list as one) and delayed by
a uniform time in ``delay_s``. Delays go through one FIFO queue per connection and
direction, so the order on each connection is preserved.

Dropping a sealed client->server message leaves a counter gap the server rejects: that
is the point (see docs/reliability.md). Run it by hand with::

    python -m tests.lossy_proxy --upstream tcp://127.0.0.1:5555 --drop 0.05 --delay 0.001,0.01

and add ``--keyed`` in front of a keyed server (the default; not ``--insecure``).
The command exits with a one-line error (status 2) when ``--upstream`` is no TCP endpoint,
when nothing accepts connections there within ``--wait-s`` of its start, or when the
upstream refuses connections for ``--wait-s`` once it ran; status 1 when one of its own
tasks failed. Where it exits, its counters are printed as at a stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from sl_pipeline.config import check_endpoint
from sl_pipeline.errors import ConfigError
from sl_pipeline.gate import MAX_CONNECTIONS_PER_KEY, USERNAME

HANDSHAKE_PREFIXES = (b"sl-hello", b"sl-welcome", b"sl-refuse")
DIRECTIONS = ("both", "upstream", "downstream")
log = logging.getLogger("sl_pipeline.lossy_proxy")
QUEUE_MAX = 10_000  # per connection and direction; a full queue pushes back on the reader


@dataclass
class _Link:
    """One client identity: its upstream DEALER, two delay queues and three tasks."""

    identity: bytes
    dealer: Any
    up: asyncio.Queue[tuple[float, list[Any]]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_MAX)
    )
    down: asyncio.Queue[tuple[float, list[Any]]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_MAX)
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class LossyProxy:
    def __init__(
        self,
        upstream: str,
        *,
        drop_rate: float = 0.0,
        delay_s: tuple[float, float] = (0.0, 0.0),
        seed: int = 0,
        drop_direction: str = "both",
        max_messages: int = 1_000_000,
        max_links: int = 1024,
        spare_handshakes: bool = False,
        keyed: bool = False,
    ) -> None:
        if not 0.0 <= drop_rate <= 1.0:
            raise ConfigError(f"drop_rate = {drop_rate}: use a probability in [0, 1]")
        low, high = delay_s
        if not 0.0 <= low <= high <= 60.0:
            raise ConfigError(f"delay_s = {delay_s}: use (low, high) with 0 <= low <= high <= 60")
        if drop_direction not in DIRECTIONS:
            raise ConfigError(f"drop_direction = {drop_direction!r}: use one of {DIRECTIONS}")
        if max_messages < 1 or max_links < 1:
            raise ConfigError("max_messages and max_links must be at least 1")
        check_endpoint(upstream, "upstream")  # before a client's first message finds it bad
        self.upstream = upstream
        self.drop_rate = drop_rate
        self.delay_s = (low, high)
        self.drop_direction = drop_direction
        self.max_messages = max_messages
        self.max_links = max_links
        self.spare_handshakes = spare_handshakes
        # A keyed server admits a connection by the client's gate token (sl_pipeline.gate):
        # the proxy takes each client's token and presents it upstream for that client.
        self.keyed = keyed
        self._zap: Any = None
        self._rng = random.Random(seed)
        self._forced = {"upstream": 0, "downstream": 0}
        self.forwarded_up = self.forwarded_down = 0
        self.dropped_up = self.dropped_down = 0
        self.received = 0  # messages read from either side, forwarded or not
        self._ctx: zmq.asyncio.Context | None = None
        self._front: Any = None
        self._links: OrderedDict[bytes, _Link] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._endpoint: str | None = None
        self.failed: asyncio.Future[str] | None = None  # a task's failure, once one failed

    # ---- public surface ----------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self._endpoint is None:
            raise RuntimeError("LossyProxy.endpoint: call start() first")
        return self._endpoint

    @property
    def forwarded(self) -> int:
        return self.forwarded_up + self.forwarded_down

    @property
    def dropped(self) -> int:
        return self.dropped_up + self.dropped_down

    @property
    def links(self) -> int:
        return len(self._links)

    def counters(self) -> dict[str, int]:
        return {
            "received": self.received,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "forwarded_up": self.forwarded_up,
            "forwarded_down": self.forwarded_down,
            "dropped_up": self.dropped_up,
            "dropped_down": self.dropped_down,
        }

    def drop_next(self, direction: str = "upstream", count: int = 1) -> None:
        """Drop the next ``count`` messages going ``direction`` ("upstream" is
        client->server), whatever ``drop_rate`` says: deterministic fault tests."""
        if direction not in self._forced or count < 0:
            raise ConfigError(f"drop_next({direction!r}, {count}): use upstream|downstream, >= 0")
        self._forced[direction] += count

    async def start(self) -> None:
        if self._ctx is not None:
            raise RuntimeError("LossyProxy already started")
        self._ctx = zmq.asyncio.Context()
        self.failed = asyncio.get_running_loop().create_future()
        self._front = self._socket(zmq.ROUTER)
        if self.keyed:
            self._zap = self._socket(zmq.REP)
            self._zap.bind("inproc://zeromq.zap.01")
            self._tasks.append(self._spawn(self._pass_tokens(), "lossy-zap"))
            self._front.plain_server = True
            self._front.zap_domain = b"lossy-proxy"
        self._front.bind("tcp://127.0.0.1:*")
        self._endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks.append(self._spawn(self._read_front(), "lossy-front"))

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Cancel every task, close every socket with linger 0; bounded by ``timeout_s``."""
        tasks = [*self._tasks, *(t for link in self._links.values() for t in link.tasks)]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for link in self._links.values():
            link.dealer.close(linger=0)
        self._links.clear()
        self._tasks.clear()
        if self._front is not None:
            self._front.close(linger=0)
            self._front = None
        if self._zap is not None:
            self._zap.close(linger=0)
            self._zap = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ---- internals ---------------------------------------------------------------------
    def _socket(self, kind: int) -> Any:
        assert self._ctx is not None
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _budget_left(self) -> bool:
        return self.received < self.max_messages

    def _drop(self, direction: str, frames: list[Any]) -> bool:
        if self._forced[direction] > 0:
            self._forced[direction] -= 1
            return True
        if self.drop_direction not in ("both", direction) or self.drop_rate <= 0.0:
            return False
        if self.spare_handshakes and frames and bytes(frames[0].bytes[:10]) in HANDSHAKE_PREFIXES:
            return False
        return self._rng.random() < self.drop_rate

    def _due(self) -> float:
        low, high = self.delay_s
        return time.monotonic() + (self._rng.uniform(low, high) if high > 0 else 0.0)

    async def _pass_tokens(self) -> None:
        """Admit every client; its token becomes the connection's User-Id (hex)."""
        while True:
            request = await self._zap.recv_multipart()
            token = request[7].hex().encode() if len(request) >= 8 else b""
            await self._zap.send_multipart([request[0], request[1], b"200", b"OK", token, b""])

    def _link(self, identity: bytes, token: str = "") -> _Link:
        link = self._links.get(identity)
        if link is not None:
            self._links.move_to_end(identity)
            return link
        if len(self._links) >= self.max_links:
            self._evict(next(iter(self._links)))
        dealer = self._socket(zmq.DEALER)
        if token:
            dealer.plain_username, dealer.plain_password = USERNAME, bytes.fromhex(token)
        dealer.connect(self.upstream)
        link = _Link(identity, dealer)
        link.tasks = [
            self._spawn(self._read_back(link), "lossy-back"),
            self._spawn(self._pump(link, "upstream"), "lossy-up"),
            self._spawn(self._pump(link, "downstream"), "lossy-down"),
        ]
        self._links[identity] = link
        return link

    def _evict(self, identity: bytes) -> None:
        """Forget the least recently used link; stop() still awaits its tasks."""
        link = self._links.pop(identity)
        for task in link.tasks:
            task.cancel()
        self._tasks = [t for t in self._tasks if not t.done()] + link.tasks
        link.dealer.close(linger=0)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._report)
        return task

    def _report(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("lossy proxy task %s failed: %r", task.get_name(), task.exception())
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(f"its task {task.get_name()} failed: {task.exception()!r}")

    async def _read_front(self) -> None:
        while self._budget_left():
            identity, *frames = await self._front.recv_multipart(copy=False)
            self.received += 1
            if self._drop("upstream", frames):
                self.dropped_up += 1
                continue
            token = frames[0].get("User-Id") if self.keyed and frames else ""
            await self._link(identity.bytes, token).up.put((self._due(), frames))

    async def _read_back(self, link: _Link) -> None:
        while self._budget_left():
            frames = await link.dealer.recv_multipart(copy=False)
            self.received += 1
            if self._drop("downstream", frames):
                self.dropped_down += 1
                continue
            await link.down.put((self._due(), frames))

    async def _pump(self, link: _Link, direction: str) -> None:
        """Send queued messages in FIFO order, each no earlier than its due time."""
        queue = link.up if direction == "upstream" else link.down
        for _ in range(self.max_messages):
            due, frames = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if direction == "upstream":
                await link.dealer.send_multipart(frames, copy=False)
                self.forwarded_up += 1
            else:
                await self._front.send_multipart([link.identity, *frames], copy=False)
                self.forwarded_down += 1


# ---- command line ------------------------------------------------------------------------
def _delay(text: str) -> tuple[float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("use LOW,HIGH in seconds, e.g. 0.001,0.01")
    return (parts[0], parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lossy_proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--upstream", required=True, help="server endpoint, e.g. tcp://127.0.0.1:5555"
    )
    parser.add_argument("--drop", type=float, default=0.0, help="drop probability per message")
    parser.add_argument("--delay", type=_delay, default=(0.0, 0.0), help="LOW,HIGH seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direction", choices=DIRECTIONS, default="both")
    parser.add_argument("--max-messages", type=int, default=1_000_000)
    parser.add_argument(
        "--spare-handshakes",
        action="store_true",
        help="never drop sl-hello/sl-welcome/sl-refuse messages",
    )
    parser.add_argument(
        "--keyed",
        action="store_true",
        help="the server is keyed (not --insecure): pass each client's connection token on",
    )
    parser.add_argument(
        "--max-links",
        type=int,
        default=None,
        help="upstream connections kept, the least recently used closed beyond it (default: "
        f"{MAX_CONNECTIONS_PER_KEY - 1} with --keyed, as the server admits "
        f"{MAX_CONNECTIONS_PER_KEY} per key at once and the proxy cannot see a client's "
        "old connection close; 1024 without)",
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=10.0,
        help="how long the upstream may refuse connections, at start or later, before the "
        "proxy exits with an error (default: 10)",
    )
    args = parser.parse_args(argv)
    if args.max_links is None:
        args.max_links = MAX_CONNECTIONS_PER_KEY - 1 if args.keyed else 1024
    return args


async def _main(args: argparse.Namespace) -> dict[str, int]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proxy = LossyProxy(
        args.upstream,
        drop_rate=args.drop,
        delay_s=args.delay,
        seed=args.seed,
        drop_direction=args.direction,
        max_messages=args.max_messages,
        max_links=args.max_links,
        spare_handshakes=args.spare_handshakes,
        keyed=args.keyed,
    )
    await upstream_answers(args.upstream, args.wait_s)
    await proxy.start()
    assert proxy.failed is not None
    watch = asyncio.ensure_future(watch_upstream(args.upstream, args.wait_s))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        print(proxy.endpoint, flush=True)
        await asyncio.wait([stopped, watch, proxy.failed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (watch, stopped):
            waiter.cancel()
        await proxy.stop()
    print(json.dumps(proxy.counters()), flush=True)
    if proxy.failed.done():
        raise ProxyFailed(proxy.failed.result())
    if watch.done() and not watch.cancelled():
        watch.result()  # raises: the upstream went away
    return proxy.counters()


class ProxyFailed(Exception):
    """One of the proxy's own tasks failed: it forwards nothing more."""


async def upstream_answers(upstream: str, wait_s: float) -> None:
    """Return once the upstream accepts a TCP connection; ConfigError after ``wait_s``."""
    host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), max(0.1, wait_s)
            )
        except (OSError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"upstream {upstream}: nothing accepts connections there ({exc}) after "
                    f"{wait_s:g} s; start the server first, or give its endpoint in --upstream"
                ) from None
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return


async def watch_upstream(upstream: str, wait_s: float, every_s: float = 2.0) -> None:
    """Raise ConfigError once the upstream refused connections for ``wait_s``."""
    while True:
        await asyncio.sleep(every_s)
        await upstream_answers(upstream, wait_s)


def main(argv: list[str] | None = None) -> int:
    try:
        asyncio.run(_main(parse_args(argv)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ProxyFailed as exc:
        print(f"error: the lossy proxy stopped: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
