"""The client's link to the next hop (the server, or a relay): join and exchange.

:class:`Upstream` joins with the handshake, retrying with capped exponential backoff and
jitter, and ``request`` sends a message and waits for its reply, rejoining and resending the
same request after a lost peer or a wait that ran out. It is the one place where a client
touches the network: the step runners only see its ``request``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import zmq.asyncio

from sl_pipeline.config import ClientConfig
from sl_pipeline.errors import (
    CipherError,
    PeerError,
    ProtocolError,
    ReplyTimeoutError,
    SLError,
    TransportError,
)
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message, check_answers
from sl_pipeline.models import fingerprint
from sl_pipeline.retransmit import RetransmitTimer
from sl_pipeline.transport import DealerConnection
from workers.client.connection import ClientConnection
from workers.client.patience import MIN_TRIES, WAIT_CODES, Patience, max_tries
from workers.client.replies import is_run_id, shown
from workers.ops.metrics import WorkerMetrics
from workers.runtime.diagnose import lost_server, no_server, refused
from workers.runtime.resends import RESEND, RecordedSteps
from workers.runtime.startup import load_own_key, load_peer_key, warn_insecure

log = logging.getLogger("sl_pipeline.client")
MAX_RETRIES_PER_REQUEST = 100
BYE_LINGER_MS = 500  # how long closing may wait for a bye to leave
PEER_ROLES = ("server", "relay")
T = TypeVar("T")


class Unanswered:
    """How long one request (or the steps in flight) went unanswered across its resends and
    rejoins. A server that joins the client again and again but answers none of them (a
    broken or hostile one, or a link that loses every reply) ends the client once
    ``client.retry_for_s`` has passed and ``MIN_TRIES`` sends went unanswered: before, it
    was asked 100 times, each wait up to ``client.timeout_s`` (50 minutes by default)."""

    def __init__(self, window_s: float, what: str) -> None:
        self.window_s, self.what = window_s, what
        self.since, self.tries = time.monotonic(), 0

    def failed(self, exc: SLError) -> None:
        """One more send went unanswered (``exc`` says how): a TransportError past the bound."""
        self.tries += 1
        waited = time.monotonic() - self.since
        if self.tries >= MIN_TRIES and waited >= self.window_s:
            raise TransportError(
                f"no answer to {self.what} after {self.tries} tries in {waited:.0f}s "
                f"(client.retry_for_s = {self.window_s:g}): the next hop takes this client's "
                f"requests but answers none (the last: {exc})"
            )


class Stopped(Exception):
    """SIGTERM/SIGINT asked the client to stop while it waited for the next hop."""


def make_handshake(cfg: ClientConfig, base: Path, topology: str) -> ClientHandshake:
    """The client's side of the handshake: its hello, and its keys unless insecure."""
    c = cfg.client
    hello = {
        "v": PROTOCOL_VERSION,
        "client": c.name,
        "model": fingerprint(cfg.model, topology),
        "role": c.role,
        "recover": [RESEND],  # it resends the steps a relay lost (workers/runtime/resends.py)
    }
    if c.insecure:
        warn_insecure("client")
        return ClientHandshake(hello, None, None, cfg.limits.max_frames)
    static = load_own_key(base, c.key, "client.key")
    server_key = load_peer_key(base, c.server_key, "client.server_key")
    return ClientHandshake(hello, static, server_key, cfg.limits.max_frames, c.ciphers)


def _handshake_result(code: str) -> str:
    return code if code in ("not_admitted", "version") else "bad_handshake"


class Upstream:
    """One client's connection to the next hop, with its round-trip timers and counters."""

    def __init__(
        self, cfg: ClientConfig, metrics: WorkerMetrics, handshake: ClientHandshake
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.handshake = handshake
        self.ctx: zmq.asyncio.Context | None = None
        self.conn: DealerConnection | None = None
        self.peer = "server"  # what client.server points at; a relay says so in its welcome
        # Reply waits follow the measured round trip (RFC 6298), at most the configured bound.
        self.timer = RetransmitTimer(cfg.client.timeout_s)
        self.hello_timer = RetransmitTimer(cfg.client.connect_timeout_s)
        self.adaptive_wait = True  # off where a reply waits for other parties
        self.connected = False  # between a completed handshake and a lost peer
        self.retries = 0
        self.bytes = {"sent": 0, "received": 0}
        self.stop = asyncio.Event()  # set by SIGTERM/SIGINT: every wait here ends at once
        self.patience = Patience(cfg.client.retry_for_s)  # for refusals that mean "later"
        self.run = ""  # the server's run, as a relay's answers name it (a server's welcome does)
        self.welcome: dict[str, Any] = {}  # the last one
        self.recorded = RecordedSteps()  # the last steps' requests, for a relay that lost them
        self._stop_watch: asyncio.Future[Any] | None = None  # done once ``stop`` is set

    def hello(self, start: tuple[int, int], last_applied: tuple[int, int] | None) -> dict[str, Any]:
        """What this client asks for: its run, whether it trains, where it resumes from."""
        c = self.cfg
        return {
            **self.handshake.hello,
            "run": c.client.run,
            "takeover": c.client.takeover,
            "intent": "train" if start[0] < c.train.epochs else "infer",
            "resume": list(last_applied) if last_applied else None,
        }

    def _count(self, direction: str, kind: str, nbytes: int) -> None:
        self.bytes[direction] += nbytes
        self.metrics.record_message(direction, kind, nbytes)

    def _new_connection(self) -> DealerConnection:
        self.set_connected(False)
        if self.conn is not None:
            self.conn.close()
        assert self.ctx is not None
        c = self.cfg
        self.conn = ClientConnection(
            self.ctx, c.client.server, c.limits.to_limits(), self._count, self.peer
        )
        return self.conn

    async def connect(
        self, hello: Callable[[], dict[str, Any]], had_steps: Callable[[], bool]
    ) -> dict[str, Any]:
        """Handshake (``hello()`` says what to ask for), retrying with capped exponential
        backoff and jitter; returns the welcome. ``had_steps()`` tells a network fault
        (the peer was there) from a configuration one when the retries run out."""
        c = self.cfg.client
        deadline = time.monotonic() + c.retry_for_s
        delay = 0.2
        for _ in range(2 * max_tries(c.retry_for_s)):  # ends by the deadline before
            conn = self._new_connection()
            sent = time.monotonic()
            try:
                self.handshake.hello = hello()
                welcome = await self._unless_stopped(
                    conn.handshake(self.handshake, self.hello_timer.timeout("hello"))
                )
                self.hello_timer.sample("hello", time.monotonic() - sent)
                self.metrics.record_handshake("ok")
                self._joined(welcome)
                return welcome
            except PeerError as exc:
                self.metrics.record_handshake(_handshake_result(exc.remote_code))
                if exc.remote_code in WAIT_CODES:  # one window across every rejoin
                    wait = self.patience.refused(exc, time.monotonic(), random.random())
                elif not exc.retryable or time.monotonic() + delay > deadline:
                    raise refused(exc, self.cfg) from None
                else:
                    wait = delay * (0.5 + random.random())
                log.warning("the %s refused to join (%s); retrying in %.1fs", self.peer, exc, wait)
            except CipherError:
                raise  # an authentic server's pick outside our offer: retrying repeats it
            except (TransportError, ProtocolError) as exc:
                if isinstance(exc, ReplyTimeoutError):
                    self.hello_timer.expired("hello")
                if time.monotonic() + delay > deadline:
                    if had_steps():  # it was there: a network fault, not a config one
                        raise lost_server(self.cfg) from None
                    raise no_server(self.cfg) from None
                log.warning("no answer from %s (%s); retrying", c.server, exc)
                wait = delay * (0.5 + random.random())
            self.retries += 1
            self.metrics.retries_total.inc()
            await self._unless_stopped(asyncio.sleep(wait))
            delay = min(delay * 2, 5.0)
        raise lost_server(self.cfg) if had_steps() else no_server(self.cfg)

    async def _unless_stopped(self, waiting: Awaitable[T]) -> T:
        """``waiting``'s result, unless ``stop`` comes first: then raise ``Stopped``. A wait
        for a peer that has gone (a reply, a hello, a backoff) must not hold a stopping
        client; a step whose reply never came is resent after a restart."""
        task = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise Stopped
        return task.result()

    def _stop_watcher(self) -> asyncio.Future[Any]:
        """One task per event loop that ends when ``stop`` is set."""
        loop = asyncio.get_running_loop()
        watcher = self._stop_watch
        if watcher is None or watcher.get_loop() is not loop:
            watcher = self._stop_watch = loop.create_task(self.stop.wait())
        return watcher

    async def reply_unless_stopped(self, conn: DealerConnection, wait: float) -> Message:
        """``conn.recv(wait)``, unless ``stop`` comes first: then raise ``Stopped``. The hot
        path of every step: a callback on one long-lived watcher cancels the wait, instead
        of two new tasks and an ``asyncio.wait`` per reply (``_unless_stopped``)."""
        watcher = self._stop_watcher()
        if watcher.done():
            raise Stopped
        task = asyncio.current_task()
        assert task is not None
        state = {"waiting": True, "stopped": False}

        def on_stop(_: object) -> None:
            if state["waiting"]:  # a callback already queued when the wait ended does nothing
                state["stopped"] = True
                task.cancel()

        watcher.add_done_callback(on_stop)
        try:
            reply = await conn.recv(wait)
        except asyncio.CancelledError:
            if not state["stopped"]:
                raise  # our caller was cancelled
            task.uncancel()
            raise Stopped from None
        finally:
            state["waiting"] = False
            watcher.remove_done_callback(on_stop)
        if self.patience.since is not None:
            self.patience.answered()
        if self.peer == "relay" and reply.kind is Kind.BACKWARD:
            self._note_run(reply.meta.get("run"))
        return reply

    def _note_run(self, run: object) -> None:
        """A relay's answer to a step names the server's run it was trained in: the relay
        learns it from the server at the client's first step, after its own welcome."""
        if run is None or run == "" or run == self.run:
            return
        if not is_run_id(run):  # it goes into the client's log and checkpoint
            raise ProtocolError(f"the relay's reply names run {shown(run)}, which is no run id")
        self.run = str(run)
        log.info("the relay trains this client in run %s", run)

    def _joined(self, welcome: dict[str, Any]) -> None:
        self.set_connected(True)
        self.welcome = welcome
        role = welcome.get("role", "server")
        self.peer = role if role in PEER_ROLES else "server"
        assert self.conn is not None
        self.conn.peer = self.peer

    def fixed_wait(self, timeout_s: float | None) -> float | None:
        """A request's fixed wait per try, where it waits for other parties (``timeout_s``,
        or ``client.timeout_s`` for a runner whose replies do); None: the round trip's."""
        return timeout_s or (None if self.adaptive_wait else self.cfg.client.timeout_s)

    async def request(
        self,
        message: Message,
        rejoin: Callable[[], Any],
        timeout_s: float | None = None,
    ) -> Message:
        """Send and wait for the reply; on a lost peer or a wait that ran out, ``rejoin()``
        and resend the same message. The wait follows the measured round trip unless
        ``timeout_s`` fixes it (a wait for other clients, which no round trip predicts). A
        reply that answers another request (kind or step) is refused
        (``ReplyMismatchError``), never taken for this one's."""
        kind = message.kind.value
        fixed = self.fixed_wait(timeout_s)
        last: SLError | None = None
        step = f"its {kind} of step ({message.epoch}, {message.step})"
        unanswered = Unanswered(self.cfg.client.retry_for_s, step)
        for attempt in range(MAX_RETRIES_PER_REQUEST):
            assert self.conn is not None
            wait = fixed or self.timer.timeout(kind)
            sent = time.monotonic()
            try:
                self.recorded.record(message)
                await self.conn.send(message)
                reply = await self.reply_unless_stopped(self.conn, wait)
            except (TransportError, PeerError) as exc:
                if isinstance(exc, PeerError) and not exc.retryable:
                    raise
                last = exc
                if isinstance(exc, ReplyTimeoutError) and fixed is None:
                    self.timer.expired(kind)
                if isinstance(exc, PeerError) and exc.remote_code in WAIT_CODES:
                    await self.wait_out(exc)
                else:
                    self.lost(exc)
                    if fixed is None:  # a fixed wait waits for other parties' pace
                        unanswered.failed(exc)
                await rejoin()
                continue
            if attempt == 0 and fixed is None:  # Karn: a resent request gives no sample
                self.timer.sample(kind, time.monotonic() - sent)
            return check_answers(message, reply)
        raise TransportError(
            f"gave up after {MAX_RETRIES_PER_REQUEST} retries of one {kind} (the last: {last})"
        )

    async def wait_out(self, exc: PeerError) -> None:
        """A step refused with a code that means "later" (``WAIT_CODES``): leave the live
        session with a bye (a rejoin beside it would be refused as ``name_in_use``), then
        wait within the window; the caller rejoins and resends."""
        wait = self.patience.refused(exc, time.monotonic(), random.random())
        log.warning("the %s refused the step (%s); asking again in %.1fs", self.peer, exc, wait)
        if self.conn is not None and self.connected:
            bye = Message(kind=Kind.BYE, client=self.cfg.client.name, meta={"finished": False})
            with contextlib.suppress(SLError, zmq.ZMQError):
                await self.conn.send(bye)
            self.conn.close(BYE_LINGER_MS)
            self.conn = None
        self.set_connected(False)
        self.retries += 1
        self.metrics.retries_total.inc()
        await self._unless_stopped(asyncio.sleep(wait))

    def lost(self, exc: Exception) -> None:
        log.warning("lost the %s (%s); rejoining", self.peer, exc)
        self.retries += 1
        self.metrics.retries_total.inc()

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.peers_connected.set(int(connected))
        self.metrics.peers_authenticated.set(int(connected))

    def close(self, linger_ms: int = 0) -> None:
        """Close; ``linger_ms`` lets a message already sent (the bye) leave first."""
        if self.conn is not None:
            self.conn.close(linger_ms)
        if self._stop_watch is not None:
            self._stop_watch.cancel()
            self._stop_watch = None
        self.set_connected(False)
