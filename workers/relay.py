"""A relay in a multi-hop chain: client -> relay -> ... -> server.

It holds one middle segment. Downstream peers join it as they would a server (its own key,
its own admitted set); it joins the next hop upstream as a client would. Each hop has its
own Noise session, so what one hop seals only the next hop can open. Forward: run the segment,
pass the output upstream, get its gradient back, finish the backward pass and step, return
the gradient at this relay's input.

With ``[checkpoint] dir`` it checkpoints every ``checkpoint.every_steps`` applied steps,
before the reply leaves (segment, optimizer, reply cache, applied-step log); after a ``kill
-9`` its welcome names the client's last step it holds, and the client resends its requests
after it (:mod:`workers.runtime.resends`). Every N > 1 steps, it logs the requests applied
between checkpoints and, restarted, runs the steps it lost again itself in their first
order before it takes a message (:mod:`workers.runtime.requestlog`); the next hop answers
them from its cache, and the clients' resends are answered from the replayed replies.

A long-lived relay serves run after run, as the server does: when a client starts afresh
it joins the server again, whose welcome names the run the chain trains in now; if that is
not the run its segment trained in, it saves that segment (``relay.save``) and starts the
new run from the initial weights, with an empty reply cache.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline.config import RelayConfig, check_endpoint, resolve_path
from sl_pipeline.errors import (
    CheckpointError,
    ConfigError,
    OverloadedError,
    PeerError,
    ProtocolError,
    SLError,
    TransportError,
)
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.lowbit import Residuals
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message, check_answers, error_message
from sl_pipeline.models import (
    build_segments,
    fingerprint,
    make_optimizer,
    resolve_device,
    segment_inputs,
)
from sl_pipeline.tensors import all_finite, as_input, read_tensor, wire_tensors
from sl_pipeline.transport import DealerConnection
from workers.client.replies import checked_welcome, reply_tensor
from workers.ops.metrics import WorkerMetrics
from workers.runtime.appliedlog import AppliedLog
from workers.runtime.checkpoint import open_store
from workers.runtime.diagnose import probe
from workers.runtime.freshstarts import FreshStarts
from workers.runtime.peers import Listen, Peer, reject_reason
from workers.runtime.relaystate import RelayCheckpoints
from workers.runtime.resends import RESEND, check_not_stale, check_resends, check_server_every
from workers.runtime.savedmodel import check_writable, save_weights
from workers.runtime.service import Replies, RouterService
from workers.runtime.startup import load_own_key, load_peer_key, warn_insecure
from workers.runtime.stopping import GivesWayOnStop
from workers.server.engines.base import EVAL_BATCH, run_segment
from workers.server.replycache import MIB, ReplyCache

log = logging.getLogger("sl_pipeline.relay")


class RelayWorker(RelayCheckpoints, GivesWayOnStop, RouterService):
    role = "relay"

    def __init__(self, cfg: RelayConfig, base: Path, metrics: WorkerMetrics | None = None) -> None:
        r = cfg.relay
        relays, ciphers = frozenset(r.relays), tuple(r.ciphers)
        listen = Listen(
            r.bind, r.key, r.admitted, r.insecure, 64, 600.0, "relay", relays, ciphers=ciphers
        )
        limits, model = cfg.limits.to_limits(), fingerprint(cfg.model, "multihop")
        super().__init__(listen, cfg.ops, limits, base, model, metrics)
        check_endpoint(r.upstream, "relay.upstream")
        self.cfg = cfg
        segments = build_segments(cfg.model, "multihop")
        if not 0 < r.segment < len(segments) - 1:
            raise ConfigError(
                f"relay.segment = {r.segment} must be a middle segment (1..{len(segments) - 2})"
            )
        self.device = resolve_device(cfg.train.device)
        self.max_batch = r.max_batch or max(cfg.train.batch_size, EVAL_BATCH)
        if self.max_batch < 1:
            raise ConfigError(f"relay.max_batch must be at least 1, got {r.max_batch}")
        self.max_abs = cfg.limits.max_abs_value  # activations and gradients it is sent
        self.segment = segments[r.segment].to(self.device)
        self.initial = {k: v.clone() for k, v in self.segment.state_dict().items()}
        # One sample of a client's ``act``, checked before the segment runs on it.
        self.act_shape = segment_inputs(segments, cfg.model.in_shape)[r.segment]
        self.residuals = Residuals()  # int2-ef: per client, what its gradients still owe
        self.optimizer = self._new_optimizer()
        self.upstream_hs = self._upstream_handshake()
        self.ctx: zmq.asyncio.Context | None = None
        self.upstream: DealerConnection | None = None
        self.joined_upstream = False
        self.replies, self.applied_log = self._new_replies(), AppliedLog()  # steps applied
        self.run_id = ""  # the run the server's last welcome named
        self.trained_run = ""  # the run the segment's weights trained in ("" = none yet)
        # clients that started afresh: the server is asked for the run at their first step
        hit = functools.partial(self.metrics.record_bound, "relay_rejoins")
        self.check_run = FreshStarts(r.rejoins_per_s, r.rejoin_burst, r.max_names, hit)
        self.steps_applied = 0
        save = self._save_path()
        self.made_folders = check_writable(save, "relay.save") if save is not None else []
        self.ckpt = open_store(cfg.checkpoint, base, r.name)
        self.checkpoint_every = max(1, cfg.checkpoint.every_steps) if self.ckpt else 1
        self.requests = self._open_requests(self.checkpoint_every)
        self.resumed_from = self._restore()
        self._saved_at = self.steps_applied

    def _new_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        return make_optimizer(list(self.segment.parameters()), t.optimizer, t.lr, t.momentum)

    def _new_replies(self) -> ReplyCache:
        r = self.cfg.relay
        return ReplyCache(
            max_names=max(1, r.max_names),
            on_hit=lambda: self.metrics.record_bound("relay_cache"),
            max_bytes=max(1, r.reply_cache_mib) * MIB,
            on_bytes_hit=lambda: self.metrics.record_bound("reply_cache_bytes"),
            digests=False,  # it runs the steps it lost again itself: no redo reaches it
        )

    async def _follow_run(self, msg: Message) -> None:
        """Join the server again to learn the run the chain trains in now; a run other than
        the segment's starts from the initial weights (the server's does too). Only for a
        well-formed step: a malformed one (or a flood of them) asks nothing of the server."""
        read_tensor(msg, "act", self.max_batch, self.max_abs, self.act_shape)
        self.check_run.allow(msg.client, time.monotonic())  # bounded: each costs the server
        welcome = await self.unless_stopping(self._join_upstream(speaking_for=msg.client))
        self.check_run.asked(msg.client)  # once the server answered: a failed join asks again
        self._start_afresh_if_new_run()
        if welcome.get("finished") is True:
            # It finished its part of this run already: a new process of it starts over, and
            # none of these replies is its. (A restart within its run resends its steps: they
            # are answered from here, as the server answers them from its cache.)
            self.replies.forget(msg.client)

    def _start_afresh_if_new_run(self) -> None:
        if not self.trained_run or not self.run_id or self.trained_run == self.run_id:
            return
        log.info("run %s ended here; run %s starts afresh", self.trained_run, self.run_id)
        self._save_segment()
        self.segment.load_state_dict(self.initial)
        self.optimizer = self._new_optimizer()
        self.replies, self.applied_log = self._new_replies(), AppliedLog()
        self.residuals = Residuals()
        self.trained_run = ""
        if self.pending:  # lost steps of the run that ended: not run again
            self.pending, self.replaying = [], False
            if self.requests is not None:
                self.requests.checkpointed()

    def accept(self, hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        """The welcome: a relay, the peer's last step it holds, how often it checkpoints
        (``recover = "resend"``: a peer ahead of ``applied`` resends its steps after it)."""
        name = self.peer_name(hello, key)
        check_resends(hello, name, self.cfg.relay.name, self.checkpoint_every)
        if hello.get("intent", "train") == "train" and hello.get("resume") is None:
            self.check_run.mark(name)  # perhaps a new run: ask the server before its first step
        last = self.replies.newest(name, Kind.FORWARD.value)
        return {
            **super().accept(hello, key),
            "role": "relay",
            "applied": list(last) if last else None,
            "checkpoint_every": self.checkpoint_every,
            "recover": RESEND,
        }

    def _upstream_handshake(self) -> ClientHandshake:
        r = self.cfg.relay
        hello = {"v": PROTOCOL_VERSION, "client": r.name, "role": "relay"}
        hello["model"] = self.fingerprint
        if r.insecure:
            warn_insecure("relay")
            return ClientHandshake(hello, None, None, self.limits.max_frames)
        return ClientHandshake(
            hello,
            load_own_key(self.base, r.key, "relay.key"),
            load_peer_key(self.base, r.upstream_key, "relay.upstream_key"),
            self.limits.max_frames,
            r.ciphers,
        )

    async def on_start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        try:
            await self._join_upstream()
        except TransportError:  # before any step: an address or a start order to fix
            upstream = self.cfg.relay.upstream
            raise ConfigError(
                f"relay.upstream = {upstream!r}: no sl-pipeline server answered within "
                f"{self.cfg.relay.timeout_s:g}s; {probe(upstream)}"
            ) from None
        # restored from a checkpoint taken in a run that has ended since (checkpoints every
        # N > 1 steps): the client resumes, so no fresh hello would ask
        self._start_afresh_if_new_run()
        await self._replay()

    async def _replay(self) -> None:
        """Run the steps the restart lost again, in the order first applied (every
        client's, interleaved as they were), before any message is taken: from the same
        weights and RNG, the next hop answers each from its cache, and the relay stands
        where it stood. Its clients' resends are then answered from the reply cache."""
        for msg in self.pending:
            try:
                await self._apply(msg)
            except SLError as exc:  # the log keeps them; the next start tries again
                raise CheckpointError(
                    f"relay {self.cfg.relay.name} could not run again {msg.client}'s step "
                    f"{(msg.epoch, msg.step)}, lost in its restart ({exc}); start it again "
                    f"once {self.cfg.relay.upstream} answers (removing "
                    f"{self.requests.path if self.requests else 'its log'} loses those steps)"
                ) from None
        if self.pending:
            log.info("relay ran the %d steps it lost again", len(self.pending))
        self.pending, self.replaying = [], False
        self.checkpoint()

    async def _join_upstream(self, speaking_for: str = "") -> dict[str, Any]:
        """Join the next hop; ``speaking_for`` asks the server whether that client of this
        relay finished its part of the run (the welcome's ``finished``)."""
        assert self.ctx is not None
        if self.upstream is not None:
            self.upstream.close()
        self.upstream = DealerConnection(
            self.ctx, self.cfg.relay.upstream, self.limits, self.metrics.record_message
        )
        hello = {k: v for k, v in self.upstream_hs.hello.items() if k != "for"}
        self.upstream_hs.hello = {**hello, "for": speaking_for} if speaking_for else hello
        welcome = await self.upstream.handshake(self.upstream_hs, self.cfg.relay.timeout_s)
        self.run_id = str(checked_welcome(welcome).get("run") or "")
        check_server_every(welcome, self.cfg.relay.upstream)
        self.joined_upstream = True
        log.info("relay joined upstream %s (cipher %s)", self.cfg.relay.upstream, welcome["cipher"])
        return welcome

    async def on_stop(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
        self.checkpoint(force=True)
        if self.ckpt is not None:
            self.ckpt.release()
        if self.requests is not None:
            self.requests.close()
        self._save_segment()

    def _save_path(self) -> Path | None:
        save = self.cfg.relay.save
        return resolve_path(self.base, save, "relay.save", must_exist=False) if save else None

    def _save_segment(self) -> None:
        path = self._save_path()
        if path is not None and self.trained_run:
            save_weights(self.segment.state_dict(), path, "the relay's segment (relay.save)")

    def ready(self) -> bool:
        """Ready once the upstream hop was first joined. A link lost later is joined again
        by the next request, so the relay must keep taking requests (stay ready) meanwhile."""
        return self.bound and self.joined_upstream

    async def _ask_upstream(self, msg: Message) -> Message:
        return await self.unless_stopping(self._ask_upstream_twice(msg))  # a stop cuts it short

    async def _ask_upstream_twice(self, msg: Message) -> Message:
        """Send upstream and wait; when the next hop went away (a retryable refusal such as
        ``shutting_down``, or a lost link) rejoin it once and resend the same request. A
        link whose rejoin failed earlier is joined again first."""
        for attempt in range(2):
            try:
                if self.upstream is None or self.upstream.channel is None:
                    await self._join_upstream()
                assert self.upstream is not None
                await self.upstream.send(msg)
                return check_answers(msg, await self.upstream.recv(self.cfg.relay.timeout_s))
            except (PeerError, TransportError) as exc:
                if isinstance(exc, PeerError) and not exc.retryable:
                    raise
                if self.upstream is not None:
                    self.upstream.close()
                    self.upstream = None  # the next attempt (or request) joins afresh
                if attempt:
                    raise
                log.warning("lost the upstream hop (%s); rejoining", exc)
        raise AssertionError("unreachable")

    async def _pass_bye(self, msg: Message) -> None:
        """Tell the server that a client behind this relay left (finished or not): a run
        ends when its clients finished. No reply comes; a lost one costs nothing."""
        if self.upstream is None:
            return
        if not self.upstream.sock.get(zmq.EVENTS) & zmq.POLLOUT:
            # its server is gone and the link's queue full: a send would wait for ever, the
            # relay answering nobody; the next request joins afresh
            log.warning("could not pass %s's bye upstream: the link takes nothing", msg.client)
            self.upstream.close()
            self.upstream = None
            return
        try:
            await self.upstream.send(msg)
        except (SLError, zmq.ZMQError) as exc:
            log.debug("could not pass %s's bye upstream: %s", msg.client, exc)

    async def dispatch(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        try:
            msg = msg.spoken_by(self.speaker(peer, msg))
            if msg.kind is Kind.FORWARD:
                if msg.client in self.check_run:
                    await self._follow_run(msg)
                return [(identity, await self._forward(msg))]
            if msg.kind in (Kind.EVALUATE, Kind.PREDICT):
                return [(identity, await self._infer(msg))]
            if msg.kind is Kind.HEARTBEAT:
                return [(identity, msg.reply(Kind.HEARTBEAT))]
            if msg.kind is Kind.BYE:
                self.forget(identity)
                await self._pass_bye(msg)
                return []
            raise ProtocolError(f"a relay does not accept {msg.kind.value} messages")
        except PeerError as exc:  # the next hop refused: pass its reason down the chain
            reply = error_message(exc.remote_code, exc.reason, retryable=exc.retryable, request=msg)
            return [(identity, reply)]
        except TransportError as exc:  # the next hop is unreachable: the client may retry
            self.reject(peer, reject_reason(exc), exc)
            return [(identity, error_message(exc.code, exc.message, retryable=True, request=msg))]
        except SLError as exc:
            self.reject(peer, reject_reason(exc), exc)
            retry = isinstance(exc, OverloadedError)  # "later", as the server says it
            return [(identity, error_message(exc.code, exc.message, retryable=retry, request=msg))]

    async def _forward(self, msg: Message) -> Message:
        step = (msg.epoch, msg.step)
        cached = self.replies.get(msg.client, Kind.FORWARD.value, step, msg)
        if cached is not None:
            log.info("%s resent forward %s: answering from cache", msg.client, step)
            return cached
        check_not_stale(step, self.replies.newest(msg.client, Kind.FORWARD.value), msg.client)
        answer = await self._apply(msg)
        self._log_step(msg)
        self.checkpoint()  # before the reply leaves: what the client saw is durable
        return answer

    async def _apply(self, msg: Message) -> Message:
        """Run the segment, ask the next hop, step; the reply, held in the reply cache."""
        act = read_tensor(msg, "act", self.max_batch, self.max_abs, self.act_shape)
        act = as_input(act, True, self.device)
        out = run_segment(self.segment, act)
        tensors: dict[str, Any] = wire_tensors("act", out, self.cfg.train.wire_dtype)
        if "labels" in msg.tensors:
            tensors["labels"] = msg.tensor("labels")
        redo = {k: v for k, v in msg.meta.items() if k == "redo"}  # a redone step says so
        reply = await self._ask_upstream(msg.follow(Kind.FORWARD, tensors=tensors, meta=redo))
        self.optimizer.zero_grad(set_to_none=True)
        grad = reply_tensor(reply, Kind.BACKWARD, "grad", self.max_abs, out.shape)
        out.backward(as_input(grad, False, self.device))
        params = [p.grad for p in self.segment.parameters() if p.grad is not None]
        if not all_finite([*params, act.grad] if act.grad is not None else params):
            raise ProtocolError("this batch's gradients are not finite; the step was not applied")
        self.optimizer.step()
        self.trained_run = self.trained_run or self.run_id or "-"
        self.steps_applied += 1
        self.metrics.record_step(self.steps_applied)
        assert act.grad is not None
        answer = msg.reply(
            Kind.BACKWARD,
            meta={**reply.meta, "run": self.run_id},  # the client learns its server's run
            tensors=wire_tensors(
                "grad", act.grad, self.cfg.train.wire_dtype, self.residuals, msg.client
            ),
        )
        self.replies.put(msg.client, Kind.FORWARD.value, (msg.epoch, msg.step), answer, msg)
        self.applied_log.append(msg.client, msg.epoch, msg.step)
        return answer

    async def _infer(self, msg: Message) -> Message:
        self.segment.eval()
        with torch.no_grad():
            act = read_tensor(msg, "act", self.max_batch, self.max_abs, self.act_shape)
            act = as_input(act, False, self.device)
            out = run_segment(self.segment, act)
        self.segment.train()
        reply = await self._ask_upstream(
            msg.follow(msg.kind, tensors=wire_tensors("act", out, self.cfg.train.wire_dtype))
        )
        return msg.reply(Kind.RESULT, meta=dict(reply.meta), tensors=dict(reply.tensors))
