"""The part every listening worker shares (server and relay): the ZMTP listener, the
handshake, the table of authenticated peers, and the rules for bad input.

A subclass implements :meth:`RouterService.dispatch`: one authenticated, decoded message in,
the replies to send out. Everything before that (authentication, decoding, limits) lives in
:mod:`workers.runtime.intake`; here, the state it reads, and the loop around it: start and
stop, one message at a time, the tick (silent peers, what came due, the heap trimmed), and
the last resort for a message whose handling failed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sl_pipeline.codec import Limits
from sl_pipeline.config import OpsConfig, check_endpoint
from sl_pipeline.errors import SLError
from sl_pipeline.gate import Gate
from sl_pipeline.handshake import ServerHandshake
from sl_pipeline.messages import Message, error_message
from sl_pipeline.transport import frames_size
from sl_pipeline.zmtp_router import ZmtpRouter
from workers.ops.metrics import WorkerMetrics
from workers.runtime.bounded import TRIM_BYTES, TRIM_EVERY_S, trim_heap
from workers.runtime.edge import EdgeReports
from workers.runtime.eventloop import running_loop
from workers.runtime.hellorates import HelloRates
from workers.runtime.intake import MessageIntake, Replies
from workers.runtime.peers import Listen, Peer, PeerTable
from workers.runtime.quietlog import QuietLog
from workers.runtime.startup import (
    bind_router,
    load_admitted,
    load_own_key,
    ops_secrets,
    start_ops,
    status_key,
    tell_peers_we_stop,
    warn_insecure,
    with_status_token,
)

log = logging.getLogger("sl_pipeline.service")
POLL_MS = 200
GOODBYE_LINGER_MS = 500  # how long closing may wait for the shutdown notices to leave
ROUTER_RCVHWM = 64  # messages queued per connection (each <= zmtp.caps_for); then reading pauses


class RouterService(MessageIntake):
    role = "server"

    def __init__(
        self,
        listen: Listen,
        ops: OpsConfig,
        limits: Limits,
        base: Path,
        fingerprint: str,
        metrics: WorkerMetrics | None,
    ) -> None:
        check_endpoint(listen.bind, f"{listen.section}.bind")
        self.ops_cfg, self.limits = with_status_token(ops, base), limits
        self.status_key = status_key(ops)  # the setting errors name
        self.base, self.fingerprint = base, fingerprint
        self.metrics = metrics or WorkerMetrics(self.role)
        # Who is in, and who may join: the rules, without I/O (the admitted keys come next).
        self.table = PeerTable(listen, self.role, fingerprint, {}, self.metrics.record_bound)
        self.gate: Gate | None = None
        self.handshake = self._make_handshake()
        self.ops_token = ops_secrets(self.ops_cfg, base, self.metrics, self.handshake.static)
        hit = lambda: self.metrics.record_bound("hello_rate")  # noqa: E731
        self.hello_rate = HelloRates(listen.hellos_per_s, listen.hello_burst, hit)
        self.session_id, self.bound = secrets.token_hex(8), False
        self._idle = True  # the receiver waits for a message (not handling one)
        self._trim_due, self._trimmed_at = False, 0.0
        self._endpoint: ZmtpRouter | None = None
        self.quiet = QuietLog(log)  # what peers can make us log, once per peer per interval
        self.edge = EdgeReports(self.metrics, self.quiet)
        self.failure: Exception | None = None  # the last message's that ended as `internal`

    def _make_handshake(self) -> ServerHandshake:
        s, section, frames = self.listen, self.listen.section, self.limits.max_frames
        if s.insecure:
            warn_insecure(self.role)
            return ServerHandshake(None, lambda key: True, insecure=True, max_frames=frames)
        static = load_own_key(self.base, s.key, f"{section}.key")
        admitted = load_admitted(self.base, s.admitted, f"{section}.admitted")
        self.table.admitted_names = admitted  # admitted public key -> the name it goes by
        self.gate = Gate(static, admitted)
        return ServerHandshake(static, lambda key: key in admitted, False, frames, s.ciphers)

    @property
    def listen(self) -> Listen:
        return self.table.listen

    @listen.setter
    def listen(self, listen: Listen) -> None:
        self.table.listen = listen

    def speaker(self, peer: Peer, msg: Message) -> str:
        return self.table.speaker(peer, msg)

    async def on_start(self) -> None:
        return None

    async def on_stop(self) -> None:
        return None

    async def on_never_served(self, bound: bool) -> None:
        """It could not start serving: its port taken (``bound`` false), its ops port taken
        or its upstream not there. By default a stop once bound; a worker may instead undo
        what building it left on disk."""
        if bound:
            await self.on_stop()

    def status(self) -> dict[str, Any]:
        return {"role": self.role, "session": self.session_id, **self.table.status()}

    def ready(self) -> bool:
        return self.bound

    def ops_routes(self) -> Callable[[Any], None] | None:
        """More routes for the ops HTTP server (the server's run API)."""
        return None

    # ---- the loop --------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> dict[str, Any]:
        try:
            endpoint = await bind_router(
                self.listen.bind,
                self.listen.section,
                self.limits,
                gate=self.gate,
                on_gate=self.edge.gated,
                rcvhwm=ROUTER_RCVHWM,
                on_drop=self.edge.dropped,
            )
        except BaseException:
            await self.on_never_served(bound=False)
            raise
        self._endpoint = endpoint
        ops, serving = None, False
        try:
            await self.on_start()
            self.bound = True
            paths, token = self.ops_routes(), self.ops_token
            ops = await start_ops(self.ops_cfg, self.metrics, self.status, self.ready, paths, token)
            serving = True
            log.info(
                "%s listening on %s (event loop: %s)", self.role, self.listen.bind, running_loop()
            )
            await self._run_until(stop, endpoint)
        finally:
            self.bound = False
            self._endpoint = None
            await tell_peers_we_stop(endpoint, self.peers, self.role)
            await endpoint.drain(GOODBYE_LINGER_MS / 1000)
            endpoint.close(linger_ms=GOODBYE_LINGER_MS)
            if ops is not None:
                await ops.stop()
            await (self.on_stop() if serving else self.on_never_served(bound=True))
        return self.summary()

    async def _run_until(self, stop: asyncio.Event, endpoint: ZmtpRouter) -> None:
        """Receive and handle messages until ``stop``; a message being handled is finished.

        The receiver awaits the socket directly (no poll-then-recv: that costs an extra
        event-loop round per message); silent peers are dropped by a separate tick.
        """
        receiver = asyncio.ensure_future(self._receive(stop, endpoint))
        ticker = asyncio.ensure_future(self._tick(stop, endpoint))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({receiver, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():
                if self._idle:
                    receiver.cancel()  # waiting for a message that nobody needs any more
                await asyncio.wait({receiver})
            if not receiver.cancelled() and (error := receiver.exception()) is not None:
                raise error
        finally:
            for task in (receiver, ticker, stopping):
                task.cancel()
            await asyncio.gather(receiver, ticker, stopping, return_exceptions=True)

    async def _receive(self, stop: asyncio.Event, endpoint: ZmtpRouter) -> None:
        while not stop.is_set():
            self._idle = True
            identity, frames = await endpoint.recv()
            self._idle = False
            self._trim_due |= frames_size(frames) >= TRIM_BYTES  # hostile: trim at a tick
            try:
                await self._handle(endpoint, identity, frames)
            except Exception as exc:  # the last resort: one peer's message never ends us
                await self._internal_failure(endpoint, identity, exc)
            # Not held while we wait for the next message: a refused huge message is freed now.
            del frames
            await asyncio.sleep(0)  # recv never yields while messages wait: gate, ticker, ops

    async def _internal_failure(
        self, endpoint: ZmtpRouter, identity: bytes, exc: Exception
    ) -> None:
        """An error nobody foresaw handling one message, kept as ``failure``: a log line (the
        trace unless an SLError's: a full disk's), a metric, an ``internal`` reply to a peer."""
        self.metrics.record_rejected("internal")
        peer, self.failure = self.peers.get(identity), exc
        who, trace = peer.name if peer else "an unauthenticated peer", not isinstance(exc, SLError)
        line = "internal error while handling a message from %s: %s: %s"
        log.error(line, who, type(exc).__name__, str(exc)[:200], exc_info=exc if trace else None)
        if peer is None:
            return
        notice = error_message("internal", "the message could not be handled; see the log")
        try:
            await self._send(endpoint, identity, peer, notice)
        except Exception as failure:  # a reply we cannot send is only logged
            log.warning("could not send the internal error to %s: %s", peer.name, failure)

    async def _tick(self, stop: asyncio.Event, endpoint: ZmtpRouter) -> None:
        while not stop.is_set():
            await asyncio.sleep(POLL_MS / 1000)
            if self._idle:  # never between a message's arrival and its replies
                self._end_quiet_sessions(endpoint)
                self._trim_due |= time.monotonic() - self._trimmed_at >= TRIM_EVERY_S
                if self._trim_due:  # freed buffers (refused messages, closed strangers') back
                    self._trim_due, self._trimmed_at = False, time.monotonic()
                    trim_heap()
                try:  # what came due (time passed, a peer left); a failure ends no tick
                    await self._send_all(endpoint, self.due())
                except Exception as exc:
                    log.error("could not send what came due: %s", exc, exc_info=exc)

    def summary(self) -> dict[str, Any]:
        return {"role": self.role, "peers": len(self.peers)}

    def _end_quiet_sessions(self, endpoint: ZmtpRouter) -> None:
        """Sessions that ended without a word: silent too long, or their connection closed
        (killed, or it left) with its last messages read. What they held (a u-shaped open
        step, a vertical part) stops holding up the others now, not at the silence bound."""
        for identity, silent_s in self.table.silent(time.monotonic()):
            log.warning("dropping peer %s: silent for %.0fs", self.peers[identity].name, silent_s)
            self.forget(identity)
        gone, endpoint.gone = endpoint.gone, []
        for identity in gone:
            if (peer := self.peers.get(identity)) is not None:
                # debug: every client closes one at its end; what it held is logged where it
                # matters (an abandoned step is a warning)
                log.debug("peer %s closed its connection; its session ends", peer.name)
                self.forget(identity)

    def inbox_waiting(self) -> bool:
        """Whether another message is already queued on the socket."""
        return self._endpoint is not None and self._endpoint.pending()


__all__ = ["Replies", "RouterService"]
