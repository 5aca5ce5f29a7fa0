"""The server worker: a long-lived asyncio service on a ZeroMQ ROUTER socket.

It admits authenticated clients, holds the server segment(s) in a topology engine, answers
each FORWARD with the cut-layer gradient, and keeps serving the others when one misbehaves
or vanishes. Replies to retransmitted steps come from a cache, so a step is never applied
twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from privacy.config import PrivacyConfig
from sl_pipeline.config import ServerConfig, resolve_path
from sl_pipeline.errors import ConfigError, OverloadedError, ProtocolError
from sl_pipeline.messages import Kind, Message, error_message
from sl_pipeline.models import fingerprint

from .checkpoint import CheckpointStore, restore_rng, rng_state
from .engine import Engine, build_engine
from .metrics import WorkerMetrics
from .replycache import ReplyCache
from .service import Listen, Peer, Replies, RouterService, reject_reason

log = logging.getLogger("sl_pipeline.server")


class ServerWorker(RouterService):
    role = "server"

    def __init__(self, cfg: ServerConfig, base: Path, metrics: WorkerMetrics | None = None) -> None:
        s = cfg.server
        listen = Listen(
            s.bind,
            s.key,
            s.admitted,
            s.insecure,
            s.max_clients,
            s.client_timeout_s,
            "server",
            frozenset(s.relays),
        )
        super().__init__(
            listen,
            cfg.ops,
            cfg.limits.to_limits(),
            base,
            fingerprint(cfg.model, s.topology),
            metrics,
        )
        self.cfg = cfg
        PrivacyConfig.from_mapping(cfg.privacy).check_placement(
            s.topology, server=True, holds_labels=not s.label_holder
        )
        self.engine: Engine = build_engine(cfg, base)
        self.engine.on_bound = self.metrics.record_bound
        self.replies = ReplyCache(
            max_names=max(1, s.max_names),
            on_hit=lambda: self.metrics.record_bound("reply_cache"),
        )
        self.steps_applied = 0
        self.last_loss: float | None = None
        self.applied_log: list[list[Any]] = []  # [client, epoch, step] per applied update
        self.from_cache = 0
        self._load_saved()
        self.ckpt = self._checkpoint_store()
        self.resumed_from = self._restore() if self.ckpt else 0
        self._saved_at = self.steps_applied
        self._saved_version = self.engine.coordination_version

    # ---- checkpoints ---------------------------------------------------------------------
    def _checkpoint_store(self) -> CheckpointStore | None:
        c = self.cfg.checkpoint
        if not c.dir:
            return None
        directory = resolve_path(self.base, c.dir, "checkpoint.dir", must_exist=False)
        return CheckpointStore(directory, keep=max(1, c.keep), prefix="server", fsync=c.fsync)

    def _state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "engine": self.engine.state_dict(),
            "steps_applied": self.steps_applied,
            "rng": rng_state(),
            "replies": self.replies.entries(),
            "applied_log": self.applied_log,
        }

    def _restore(self) -> int:
        assert self.ckpt is not None
        found = self.ckpt.load_latest()
        if found is None:
            return 0
        state, path = found
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"checkpoint {path} is for another model or topology; "
                "point checkpoint.dir elsewhere or remove it"
            )
        self.engine.load_state_dict(state["engine"])
        self.steps_applied = self.engine.steps_applied = int(state["steps_applied"])
        restore_rng(state["rng"])
        self.replies.load(state["replies"])
        self.applied_log = [list(e) for e in state["applied_log"]]
        log.info("resumed from checkpoint %s at %d applied steps", path, self.steps_applied)
        return self.steps_applied

    def checkpoint(self) -> None:
        version = self.engine.coordination_version
        changed = self.steps_applied != self._saved_at or version != self._saved_version
        if self.ckpt is not None and changed:
            self.ckpt.save(self._state(), self.steps_applied)
            self._saved_at, self._saved_version = self.steps_applied, version
            self.metrics.checkpoints_total.inc()

    def _save_path(self) -> Path | None:
        if not self.cfg.server.save:
            return None
        return resolve_path(self.base, self.cfg.server.save, "server.save", must_exist=False)

    def _load_saved(self) -> None:
        path = self._save_path()
        if path is not None and path.exists():
            self.engine.model.load_state_dict(torch.load(path, weights_only=True))
            log.info("loaded the server segment from %s", path)

    async def on_stop(self) -> None:
        self.engine.settle()
        self.checkpoint()
        path = self._save_path()
        if path is not None and self.steps_applied:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.engine.model.state_dict(), path)
        log.info("server stopped after %d applied steps", self.steps_applied)

    def summary(self) -> dict[str, Any]:
        return {
            "role": "server",
            "steps_applied": self.steps_applied,
            "peers": len(self.peers),
            "resumed_from": self.resumed_from,
            "answered_from_cache": self.from_cache,
            "replied_first": self.engine.deferred_updates,
        }

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "topology": self.cfg.server.topology,
            "steps_applied": self.steps_applied,
            "last_loss": self.last_loss,
        }

    def accept(self, hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        """The welcome carries where this server stands for the client (the resume exchange)."""
        name = self.peer_name(hello, key)
        last = self.replies.newest(name, Kind.FORWARD.value)
        return {
            **super().accept(hello, key),
            "topology": self.cfg.server.topology,
            "applied": list(last) if last else None,
            # a client keeps undo points for what a crash between checkpoints may lose
            "checkpoint_every": max(1, self.cfg.checkpoint.every_steps) if self.ckpt else 1,
        }

    def forget_peer(self, peer: Peer) -> None:
        self.engine.forget(peer.name)

    def _can_reply_first(self) -> bool:
        """Defer weight gradients past the reply only when it costs nobody anything: no
        checkpoint is due with this step (it must hold the update before the reply leaves)
        and no other request is waiting (the deferred work would delay it)."""
        if not self.cfg.server.reply_first or self.inbox_waiting():
            return False
        due = self.steps_applied + 1 - self._saved_at >= max(1, self.cfg.checkpoint.every_steps)
        return self.ckpt is None or not due

    def after_replies(self) -> None:
        self.engine.settle()

    async def dispatch(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        self.engine.settle()  # no request ever sees weights without the last update
        msg = Message(
            kind=msg.kind,
            session=msg.session,
            client=self.speaker(peer, msg),
            epoch=msg.epoch,
            step=msg.step,
            meta=msg.meta,
            tensors=msg.tensors,
        )
        try:
            if msg.kind in (Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHTS):
                return self._train(identity, peer, msg)
            if msg.kind in (Kind.EVALUATE, Kind.PREDICT):
                return self.engine.evaluate(identity, msg)
            if msg.kind is Kind.HEARTBEAT:
                return [(identity, msg.reply(Kind.HEARTBEAT))]
            if msg.kind is Kind.BYE:
                log.info("client %s said bye after %d steps", peer.name, peer.applied)
                self.forget(identity)
                return []
            raise ProtocolError(f"a server does not accept {msg.kind.value} messages")
        except ProtocolError as exc:
            self.reject(peer, reject_reason(exc), exc)
            retry = isinstance(exc, OverloadedError)
            return [(identity, error_message(exc.code, exc.message, retryable=retry, request=msg))]

    def _train(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        """Apply a step at most once: a retransmitted request gets the cached reply."""
        step = (msg.epoch, msg.step)
        cached = self.replies.get(msg.client, msg.kind.value, step)
        if cached is not None:
            log.info("%s resent %s %s: answering from cache", msg.client, msg.kind.value, step)
            self.from_cache += 1
            return [(identity, cached)]
        newest = self.replies.newest(msg.client, msg.kind.value)
        if msg.kind is Kind.FORWARD and newest is not None and step < newest:
            raise ProtocolError(f"step {step} is older than the steps this server remembers")
        before = self.engine.steps_applied
        self.engine.defer_updates = self._can_reply_first()
        start = time.perf_counter()
        replies = self.engine.handle(identity, msg)
        self.metrics.server_compute_seconds.observe(time.perf_counter() - start)
        self.metrics.queue_depth.set(self.engine.queue_depth())
        self.metrics.epoch.set(msg.epoch)
        for _, reply in replies:
            if reply.kind is not Kind.ERROR:
                kind = msg.kind.value if reply.client == msg.client else _answers(reply)
                self.replies.put(reply.client, kind, (reply.epoch, reply.step), reply)
        applied = self.engine.steps_applied - before
        if applied:
            self.applied_log.extend(
                [r.client, r.epoch, r.step] for _, r in replies if r.kind is Kind.BACKWARD
            )
            peer.applied += 1
            self.steps_applied += applied
            self.metrics.record_step(self.steps_applied)
            if self.engine.last_loss is not None:
                self.last_loss = self.engine.last_loss
                self.metrics.train_loss.set(self.last_loss)
            if self.steps_applied - self._saved_at >= max(1, self.cfg.checkpoint.every_steps):
                self.checkpoint()  # before any reply leaves: what a client saw is durable
        if self.engine.coordination_version != self._saved_version:
            self.checkpoint()  # a turn or a round moved on: durable before anyone hears of it
        return replies


def _answers(reply: Message) -> str:
    """The request kind a reply to *another* client answers: its waiting WEIGHTS request
    (a round-robin turn), else its waiting FORWARD (a vertical part, a queued u-shaped step)."""
    return Kind.WEIGHTS.value if reply.kind is Kind.WEIGHTS else Kind.FORWARD.value
