"""One message in at a listening worker (server or relay): a hello answered, a sealed message
opened (or one chunk of it kept), refused with its reason, or handed to the worker's
:meth:`MessageIntake.dispatch`; then its replies sent, and the table of sessions kept.

:class:`~workers.runtime.service.RouterService` is a ``MessageIntake``: it sets the state
below (the peer table, the limits, the handshake, the metrics) and runs the loop that feeds
``_handle`` one message at a time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sl_pipeline.codec import Limits
from sl_pipeline.errors import (
    CryptoError,
    OverloadedError,
    ProtocolError,
    SLError,
    UnauthenticatedError,
)
from sl_pipeline.handshake import ServerHandshake, is_handshake, refusal
from sl_pipeline.keys import fingerprint as key_fingerprint
from sl_pipeline.messages import Message, error_message
from sl_pipeline.transport import Channel, frame_buffers, frames_size
from sl_pipeline.zmtp_router import ZmtpRouter
from workers.ops.metrics import WorkerMetrics
from workers.runtime.hellorates import HelloRates
from workers.runtime.peers import Peer, PeerTable, hello_refusal, reject_reason
from workers.runtime.quietlog import QuietLog

log = logging.getLogger("sl_pipeline.service")  # the service's lines, whichever part says them
Replies = list[tuple[bytes, Message]]


class MessageIntake:
    """The message path of :class:`~workers.runtime.service.RouterService` (which sets
    these attributes) and the hooks a worker overrides on it."""

    table: PeerTable
    metrics: WorkerMetrics
    limits: Limits
    handshake: ServerHandshake
    hello_rate: HelloRates
    quiet: QuietLog
    session_id: str

    # ---- to override (the worker's engine) ----------------------------------------------
    async def dispatch(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        raise NotImplementedError

    def forget_peer(self, peer: Peer) -> None:
        return None

    def due(self) -> Replies:
        """Replies that came due outside a request (time passed, a peer left): sent soon."""
        return []

    @property
    def peers(self) -> dict[bytes, Peer]:
        return self.table.peers

    @peers.setter
    def peers(self, peers: dict[bytes, Peer]) -> None:
        self.table.peers = peers

    def accept(self, hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        """The welcome's extra fields for a peer that may join (a subclass adds its own)."""
        self.table.check_admission(hello, key)
        return {"session": self.session_id}

    def peer_name(self, hello: dict[str, Any], key: bytes | None) -> str:
        return self.table.name_of(hello, key)

    def forget(self, identity: bytes) -> None:
        peer = self.table.remove(identity)
        # A session that never proved itself (a replayed hello) owns no engine state.
        if peer is not None and peer.confirmed:
            self.forget_peer(peer)
        self.metrics.peers_authenticated.set(len(self.peers))
        self.metrics.peers_connected.set(len(self.peers))

    async def _handle(self, endpoint: ZmtpRouter, identity: bytes, frames: list[Any]) -> None:
        buffers = frame_buffers(frames)
        nbytes = frames_size(frames)
        if is_handshake(buffers):
            self.metrics.record_message("received", "hello", nbytes)
            where = (endpoint.key_of(identity), endpoint.address_of(identity))
            answer = self._answer_hello(identity, buffers, *where)
            await self._send_raw(endpoint, identity, answer, "welcome")
            return
        peer = self.peers.get(identity)
        if peer is None:
            self.metrics.record_rejected("unauthenticated")
            source = endpoint.address_of(identity)
            self.quiet.warning(f"new {source}", "rejected a message from %s: no session", source)
            error = UnauthenticatedError("no session: complete the handshake first")
            await self._send_raw(endpoint, identity, refusal(error), "error")
            return
        peer.last_seen = time.monotonic()
        try:
            message = peer.channel.feed(buffers)
        except CryptoError as exc:
            peer.whole()
            self.reject(peer, reject_reason(exc), exc)
            await self._send_raw(endpoint, identity, refusal(exc), "error")
            return
        except ProtocolError as exc:
            peer.whole()
            self.reject(peer, reject_reason(exc), exc)
            await self._send(endpoint, identity, peer, error_message(exc.code, exc.message))
            return
        if message is None:  # a part of a chunked message; the rest is on its way
            if peer.partial_since is None:  # a head: the name's older assembly is void
                for other in self.table.other_assemblies(identity):
                    log.warning(
                        "dropping an older session of %s: it began another message", peer.name
                    )
                    self.forget(other)
            peer.partial(nbytes, peer.last_seen)
            await self._keep_inflight_budget(endpoint)
            return
        nbytes += peer.whole()
        if not peer.confirmed:
            self._confirm(identity, peer)
        self.metrics.record_message("received", message.kind.value, nbytes)
        await self._send_all(endpoint, await self.dispatch(identity, peer, message))
        await self._send_all(endpoint, self.due())
        self.after_replies()

    async def _send_all(self, endpoint: ZmtpRouter, replies: Replies) -> None:
        for target, reply in replies:
            receiver = self.peers.get(target)
            if receiver is not None:  # a peer gone meanwhile resends, and is answered then
                await self._send(endpoint, target, receiver, reply)

    async def _keep_inflight_budget(self, endpoint: ZmtpRouter) -> None:
        """Chunked messages being assembled hold their parts in memory; all peers together
        may hold ``limits.max_inflight_bytes``. Over it, the peer holding the most loses
        its session (and the buffers with it), and is told so: it rejoins and resends."""
        identity = self.table.over_budget(self.limits.max_inflight_bytes)
        if identity is None:
            return
        peer = self.peers[identity]
        self.metrics.record_bound("inflight_bytes")
        line = "dropping %s's session: its unfinished chunked message holds %d bytes and all "
        line += "peers' together exceed limits.max_inflight_bytes"
        log.warning(line, peer.name, peer.partial_bytes)
        self.forget(identity)
        error = OverloadedError("too many bytes in unfinished messages; rejoin and resend")
        await self._send_raw(endpoint, identity, refusal(error), "error")

    def after_replies(self) -> None:
        """Work that may wait until this message's replies are on their way."""
        return None

    def reject(self, peer: Peer, reason: str, exc: SLError) -> None:
        self.metrics.record_rejected(reason)
        line = "rejected message from %s (%s): %s"  # each reason of a peer's once a while
        self.quiet.warning(f"{peer.name} {reason}", line, peer.name, reason, exc.message)

    async def _send(self, endpoint: ZmtpRouter, identity: bytes, peer: Peer, msg: Message) -> None:
        nbytes = await endpoint.send_parts(identity, peer.channel.parts(msg))
        self.metrics.record_message("sent", msg.kind.value, nbytes)

    async def _send_raw(
        self, endpoint: ZmtpRouter, identity: bytes, frames: list[bytes], kind: str
    ) -> None:
        nbytes = await endpoint.send(identity, frames)
        self.metrics.record_message("sent", kind, nbytes)

    def _answer_hello(
        self, identity: bytes, buffers: list[Any], gate_key: bytes | None, source: str
    ) -> list[bytes]:
        try:
            self.hello_rate.check(gate_key, source, time.monotonic())
            reply, session, hello, key = self.handshake.answer(buffers, self.accept)
        except SLError as exc:
            result, reason = hello_refusal(exc)
            self.metrics.record_handshake(result)
            self.metrics.record_rejected(reason)
            line = "refused a handshake (%s): %s"
            self.quiet.warning(f"hello {source}", line, result, exc.message)
            return refusal(exc)
        # The name comes from the admitted key, never from what the peer claims.
        name = self.peer_name(hello, key)
        fp = key_fingerprint(key) if key else "insecure"
        for evicted in self.table.add(identity, Peer(name, Channel(session, self.limits), fp)):
            self.metrics.record_bound("pending_handshakes")
            self.forget(evicted)
        self.metrics.record_handshake("ok")
        self.metrics.peers_authenticated.set(len(self.peers))
        self.metrics.peers_connected.set(len(self.peers))
        log.info("peer %s joined (key %s, cipher %s)", name, fp, session.cipher_name)
        return reply

    def _confirm(self, identity: bytes, peer: Peer) -> None:
        """A rejoining peer replaces its old session only once the new one has proved
        itself with a valid sealed message: a replayed hello cannot evict anybody."""
        for old in self.table.confirm(identity):
            self.forget(old)


__all__ = ["MessageIntake", "Replies"]
