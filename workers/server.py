"""The server worker: a long-lived asyncio service on a ZeroMQ ROUTER socket.

It admits authenticated clients, holds the server segment(s), answers each FORWARD with
the cut-layer gradient, and keeps serving the others when one misbehaves or vanishes.
Messages from one peer are handled in order; replies to retransmitted steps come from a
cache, so a step is never applied twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from sl_pipeline.config import ServerConfig, check_endpoint
from sl_pipeline.errors import (
    CryptoError,
    LimitError,
    NotAdmittedError,
    ProtocolError,
    ReplayError,
    SLError,
    VersionError,
)
from sl_pipeline.handshake import ServerHandshake, is_handshake, refusal
from sl_pipeline.keys import fingerprint as key_fingerprint
from sl_pipeline.messages import Kind, Message, error_message
from sl_pipeline.models import fingerprint
from sl_pipeline.transport import Channel, RouterEndpoint, frame_buffers, frames_size

from .common import load_admitted, load_own_key, start_ops, warn_insecure
from .engine import Engine, build_engine
from .metrics import WorkerMetrics

log = logging.getLogger("sl_pipeline.server")
POLL_MS = 200


@dataclass
class Peer:
    name: str
    channel: Channel
    key: str  # fingerprint of the static key, or "insecure"
    last_seen: float = field(default_factory=time.monotonic)
    applied: int = 0
    last_step: tuple[int, int] | None = None
    last_reply: Message | None = None
    confirmed: bool = False  # set once the peer's first sealed message opens


class ServerWorker:
    def __init__(self, cfg: ServerConfig, base: Path, metrics: WorkerMetrics | None = None) -> None:
        self.cfg = cfg
        self.base = base
        self.metrics = metrics or WorkerMetrics("server")
        check_endpoint(cfg.server.bind, "server.bind")
        self.limits = cfg.limits.to_limits()
        self.engine: Engine = build_engine(cfg, base)
        self.replies: dict[tuple[str, str], tuple[tuple[int, int], Message]] = {}
        self.fingerprint = fingerprint(cfg.model, cfg.server.topology)
        self.peers: dict[bytes, Peer] = {}
        self.handshake = self._make_handshake()
        self.session_id = secrets.token_hex(8)
        self.steps_applied = 0
        self.last_loss: float | None = None
        self.bound = False

    def _make_handshake(self) -> ServerHandshake:
        s = self.cfg.server
        self.admitted_names: dict[bytes, str] = {}
        if s.insecure:
            warn_insecure("server")
            return ServerHandshake(None, lambda key: True, insecure=True)
        static = load_own_key(self.base, s.key, "server.key")
        admitted = load_admitted(self.base, s.admitted, "server.admitted")
        self.admitted_names = admitted
        return ServerHandshake(static, lambda key: key in admitted)

    # ---- lifecycle -------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> dict[str, Any]:
        ctx = zmq.asyncio.Context()
        endpoint = RouterEndpoint(ctx, self.cfg.server.bind, self.limits, hwm=1000)
        self.bound = True
        ops = await start_ops(self.cfg.ops, self.metrics, self.status, self.ready)
        log.info("server listening on %s (topology %s)", self.cfg.server.bind, self.cfg.server.topology)
        try:
            while not stop.is_set():
                if await endpoint.sock.poll(POLL_MS, zmq.POLLIN):
                    identity, frames = await endpoint.recv()
                    await self._handle(endpoint, identity, frames)
                self._drop_silent_peers()
        finally:
            self.bound = False
            endpoint.close()
            if ops is not None:
                await ops.stop()
            ctx.term()
        log.info("server stopped after %d applied steps", self.steps_applied)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"role": "server", "steps_applied": self.steps_applied, "peers": len(self.peers)}

    def ready(self) -> bool:
        return self.bound

    def status(self) -> dict[str, Any]:
        return {
            "role": "server",
            "topology": self.cfg.server.topology,
            "session": self.session_id,
            "peers": [{"name": p.name, "key": p.key, "applied": p.applied} for p in self.peers.values()],
            "steps_applied": self.steps_applied,
            "last_loss": self.last_loss,
        }

    def _drop_silent_peers(self) -> None:
        now = time.monotonic()
        for identity, peer in list(self.peers.items()):
            if now - peer.last_seen > self.cfg.server.client_timeout_s:
                log.warning("dropping client %s: silent for %.0fs", peer.name, now - peer.last_seen)
                self._forget(identity)

    def _forget(self, identity: bytes) -> None:
        peer = self.peers.pop(identity, None)
        if peer is not None:
            self.engine.forget(peer.name)
        self.metrics.peers_authenticated.set(len(self.peers))

    # ---- per message -----------------------------------------------------------------
    async def _handle(self, endpoint: RouterEndpoint, identity: bytes, frames: list[Any]) -> None:
        buffers = frame_buffers(frames)
        nbytes = frames_size(frames)
        if is_handshake(buffers):
            self.metrics.record_message("received", "hello", nbytes)
            await self._send_raw(endpoint, identity, self._answer_hello(identity, buffers), "welcome")
            return
        peer = self.peers.get(identity)
        if peer is None:
            self.metrics.record_rejected("unauthenticated")
            log.warning("rejected a message from an unauthenticated peer (%d bytes)", nbytes)
            error = CryptoError("no session: complete the handshake first")
            error.code = "unauthenticated"
            await self._send_raw(endpoint, identity, refusal(error), "error")
            return
        peer.last_seen = time.monotonic()
        try:
            message = peer.channel.unpack(buffers)
        except CryptoError as exc:
            reason = "replay" if isinstance(exc, ReplayError) else "bad_tag"
            self._reject(peer, reason, exc)
            await self._send_raw(endpoint, identity, refusal(exc), "error")
            return
        except ProtocolError as exc:
            self._reject(peer, _reason(exc), exc)
            reply = error_message(exc.code, exc.message)
            await self._send(endpoint, identity, peer, reply)
            return
        if not peer.confirmed:
            self._confirm(identity, peer)
        self.metrics.record_message("received", message.kind.value, nbytes)
        for target, reply in self._dispatch(identity, peer, message):
            receiver = self.peers.get(target)
            if receiver is not None:
                await self._send(endpoint, target, receiver, reply)

    def _reject(self, peer: Peer, reason: str, exc: SLError) -> None:
        self.metrics.record_rejected(reason)
        log.warning("rejected message from %s (%s): %s", peer.name, reason, exc.message)

    async def _send(self, endpoint: RouterEndpoint, identity: bytes, peer: Peer, msg: Message) -> None:
        frames = peer.channel.pack(msg)
        nbytes = await endpoint.send(identity, frames)
        self.metrics.record_message("sent", msg.kind.value, nbytes)

    async def _send_raw(self, endpoint: RouterEndpoint, identity: bytes, frames: list[bytes], kind: str) -> None:
        nbytes = await endpoint.send(identity, frames)
        self.metrics.record_message("sent", kind, nbytes)

    def _answer_hello(self, identity: bytes, buffers: list[Any]) -> list[bytes]:
        try:
            reply, session, hello, key = self.handshake.answer(buffers, self._accept)
        except SLError as exc:
            result = {NotAdmittedError: "not_admitted", VersionError: "version"}.get(type(exc), "bad_handshake")
            self.metrics.record_handshake(result)
            self.metrics.record_rejected("not_admitted" if result == "not_admitted" else "other")
            log.warning("refused a client handshake (%s): %s", result, exc.message)
            return refusal(exc)
        # The name comes from the admitted key, never from what the client claims.
        name = self.admitted_names[key] if key else str(hello.get("client", "?"))[:64]
        self._bound_unconfirmed()
        self.peers[identity] = Peer(name, Channel(session, self.limits), key_fingerprint(key) if key else "insecure")
        self.metrics.record_handshake("ok")
        self.metrics.peers_authenticated.set(len(self.peers))
        log.info("client %s joined (key %s)", name, self.peers[identity].key)
        return reply

    def _confirm(self, identity: bytes, peer: Peer) -> None:
        """A rejoining client replaces its old session only once the new one has proved
        itself with a valid sealed message: a replayed hello cannot evict anybody."""
        peer.confirmed = True
        for other_id, other in list(self.peers.items()):
            if other.name == peer.name and other_id != identity:
                self._forget(other_id)

    def _bound_unconfirmed(self) -> None:
        """Handshakes that never send a message cost bounded memory: drop the oldest."""
        pending = [i for i, p in self.peers.items() if not p.confirmed]
        for identity in pending[: max(0, len(pending) - self.cfg.server.max_clients)]:
            self._forget(identity)

    def _accept(self, hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        if hello.get("model") != self.fingerprint:
            raise ProtocolError(
                f"model/topology mismatch: client has {hello.get('model')!r}, server has "
                f"{self.fingerprint!r}; use the same [model] section and topology on both sides"
            )
        if sum(p.confirmed for p in self.peers.values()) >= self.cfg.server.max_clients:
            raise ProtocolError(f"server is full ({self.cfg.server.max_clients} clients); retry later")
        return {"session": self.session_id, "topology": self.cfg.server.topology}

    def _dispatch(self, identity: bytes, peer: Peer, msg: Message) -> list[tuple[bytes, Message]]:
        # A relay forwards for its own clients: keep them apart under the relay's name.
        client = peer.name if not msg.client or msg.client == peer.name else f"{peer.name}/{msg.client}"
        msg = Message(kind=msg.kind, session=msg.session, client=client, epoch=msg.epoch,
                      step=msg.step, meta=msg.meta, tensors=msg.tensors)
        try:
            if msg.kind in (Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHTS):
                return self._train(identity, peer, msg)
            if msg.kind in (Kind.EVALUATE, Kind.PREDICT):
                return self.engine.evaluate(identity, msg)
            if msg.kind is Kind.HEARTBEAT:
                return [(identity, msg.reply(Kind.HEARTBEAT))]
            if msg.kind is Kind.BYE:
                log.info("client %s said bye after %d steps", peer.name, peer.applied)
                self._forget(identity)
                return []
            raise ProtocolError(f"a server does not accept {msg.kind.value} messages")
        except ProtocolError as exc:
            self._reject(peer, _reason(exc), exc)
            return [(identity, error_message(exc.code, exc.message, request=msg))]

    def _train(self, identity: bytes, peer: Peer, msg: Message) -> list[tuple[bytes, Message]]:
        """Apply a step at most once: a retransmitted request gets the cached reply."""
        key = (msg.client, msg.kind.value)
        step = (msg.epoch, msg.step)
        cached = self.replies.get(key)
        if cached is not None and cached[0] == step:
            log.info("client %s retransmitted %s step %s: answering from cache", msg.client, msg.kind.value, step)
            return [(identity, cached[1])]
        if msg.kind is Kind.FORWARD and cached is not None and step < cached[0]:
            raise ProtocolError(f"step {step} is older than the last applied step {cached[0]}")
        before = self.engine.steps_applied
        start = time.perf_counter()
        replies = self.engine.handle(identity, msg)
        self.metrics.server_compute_seconds.observe(time.perf_counter() - start)
        for _, reply in replies:
            if reply.kind is not Kind.ERROR:
                self.replies[(reply.client, msg.kind.value)] = ((reply.epoch, reply.step), reply)
        applied = self.engine.steps_applied - before
        if applied:
            peer.applied += 1
            self.steps_applied += applied
            self.metrics.record_step(self.steps_applied)
            if self.engine.last_loss is not None:
                self.last_loss = self.engine.last_loss
                self.metrics.train_loss.set(self.last_loss)
        return replies


def _reason(exc: SLError) -> str:
    if isinstance(exc, LimitError):
        return "oversized"
    if isinstance(exc, VersionError):
        return "version"
    return "malformed"
