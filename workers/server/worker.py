"""The server worker: a long-lived asyncio service on a ZeroMQ ROUTER socket.

It admits authenticated clients, holds the server segment(s) of each training run in a
topology engine (see :mod:`workers.server.runs`: one process serves run after run), answers each
FORWARD with the cut-layer gradient, and keeps serving the others when one misbehaves or
vanishes. Replies to retransmitted steps come from the run's cache: no step applies twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privacy.config import PrivacyConfig
from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import (
    ConfigError,
    OverloadedError,
    ProtocolError,
    RunEndedError,
    StaleStepError,
)
from sl_pipeline.messages import Kind, Message, error_message
from sl_pipeline.models import fingerprint, resolve_device
from sl_pipeline.tenancy import Groups
from workers.ops.metrics import WorkerMetrics
from workers.runtime.appliedlog import AppliedLog
from workers.runtime.checkpoint import check_fingerprint, open_store, restore_rng, rng_state
from workers.runtime.peers import Listen, Peer, reject_reason
from workers.runtime.service import Replies, RouterService
from workers.server.engines.base import Engine
from workers.server.names import check_name_free, check_room, finished_message
from workers.server.runhost import RunHost
from workers.server.runs import ACTIVE, Run, check_run_id
from workers.server.runs_api import RunApi, group_tokens, read_token

log = logging.getLogger("sl_pipeline.server")
QUIET_CODES = ("stale_step", "redo", "run_ended")  # a client's mistake to explain, not an attack


class ServerWorker(RunHost, RouterService):
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
            s.hellos_per_s,
            s.hello_burst,
            tuple(s.ciphers),
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
        admitted = None if s.insecure else self.table.admitted_names.values()
        self.groups = Groups.for_server(s.groups, admitted, s.group)  # who trains with whom
        self.book = self.open_book(self.table, self.hello_rate)
        self.made_folders = self.check_outputs_writable()  # removed if it never starts
        with self.undone_if_refused():
            self._load_state(cfg, base)  # runs, models, tokens, the checkpoint

    def _load_state(self, cfg: ServerConfig, base: Path) -> None:
        self.peer_runs: dict[str, str] = {}  # peer name -> the run it trains in
        self.requested: dict[str, str] = {}  # peer name -> the run it asked for ("" = current)
        self.inferring: set[str] = set()  # peers whose hello said they only infer
        self.steps_applied = self.from_cache = 0  # applied: over every run (checkpoints' step)
        assert self.metrics.clients is not None  # a server's metrics have them
        self.clients = self.metrics.clients  # per-client series, visible after they exit
        self._spare: Engine | None = self.build_engine()  # the first run's, or inference's
        self._spare_trained = self._load_saved(self._spare)
        self._settle_next: Engine | None = None
        self.due_replies: Replies = []  # came due outside a request (RunHost.due)
        for info in self.book.read_index():
            self._add_record(info, f"{self.book.dir}/runs.json")
        self.admin_token = read_token(base, cfg.ops.admin_token) if cfg.ops.admin_token else None
        tokens = (self.admin_token, self.ops_cfg.status_token, self.ops_token)  # none a group's
        self.group_tokens = group_tokens(base, self.groups, *tokens, self.status_key)
        self.ckpt = open_store(cfg.checkpoint, base, "server")
        self.resumed_from = self._restore() if self.ckpt else 0
        self._saved_at, self._saved_versions = self.steps_applied, self._versions()
        self.retire_at_start()  # what the list and the checkpoint hold, by server.keep_ended_*

    def ops_routes(self) -> Callable[[Any], None]:
        return RunApi(self, self.admin_token, self.group_tokens).add_routes

    # ---- checkpoints ---------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "steps_applied": self.steps_applied,
            "rng": rng_state(),
            "runs": [run.state_dict() for run in self.book.runs.values()],
        }

    def _restore(self) -> int:
        assert self.ckpt is not None
        found = self.ckpt.load_latest()
        if found is None:
            return 0
        state, path = found
        check_fingerprint(state, path, self.fingerprint)
        self.steps_applied = int(state["steps_applied"])
        restore_rng(state["rng"])
        # runs.json knows where a model saved at a clean stop lies (that stop writes no
        # checkpoint unless a step was applied since the last one)
        models = {r.id: r.model for r in self.book.runs.values()}
        listed, self.book.runs = self.book.runs, {}
        records = state.get("runs")
        if records is None:  # written before runs existed: one active run
            records = [{"id": "run-1", "state": ACTIVE, **state}]
        for record in records:
            model = record.get("model") or models.get(str(record.get("id")), "")
            self._restore_run({**record, "model": model}, path)
        self.keep_listed(listed)
        for run in self.book.active():  # the newest last: its members' series win
            for name in sorted(run.members):
                steps, epoch = run.client_steps.get(name, 0), run.epochs.get(name)
                self.clients.restored(name, steps, epoch, name in run.done)
        log.info("resumed from checkpoint %s at %d applied steps", path, self.steps_applied)
        return self.steps_applied

    def _restore_run(self, record: dict[str, Any], path: Path) -> None:
        run = self._add_record(record)
        if "engine" in record:
            engine = run.engine or self._new_engine()
            self._load_checkpointed(engine, record["engine"], path)
            run.engine = engine
            engine.steps_applied = run.steps
        if "replies" in record:
            run.replies.load(record["replies"])
        if "applied_log" in record:
            run.applied_log = AppliedLog.from_state(record["applied_log"])

    def _versions(self) -> list[tuple[str, int]]:
        """Where each active run's group coordination stands (turns, rounds)."""
        return [
            (r.id, r.engine.coordination_version)
            for r in self.book.active()
            if r.engine is not None
        ]

    def checkpoint(self, force: bool = False) -> None:
        versions = self._versions()
        changed = self.steps_applied != self._saved_at or versions != self._saved_versions
        if self.ckpt is not None and (force or changed):
            self.ckpt.save(self._state(), self.steps_applied)
            self._saved_at, self._saved_versions = self.steps_applied, versions
            self.metrics.checkpoints_total.inc()

    async def on_stop(self) -> None:
        self.save_models(self.book.active())
        self.book.write_index()
        self.checkpoint()  # not forced: a step opened since (two exchanges) is not applied
        if self.ckpt is not None:
            self.ckpt.release()
        runs = len(self.book.runs)
        log.info("server stopped after %d applied steps in %d runs", self.steps_applied, runs)

    def summary(self) -> dict[str, Any]:
        return {
            "role": "server",
            "steps_applied": self.steps_applied,
            "peers": len(self.peers),
            "runs": [run.key for run in self.book.runs.values()],
            # the newest run's: where the server holds the labels (vertical), its own figure
            "test_accuracy": latest.test_accuracy if (latest := self.book.latest()) else None,
            "device": str(resolve_device(self.cfg.train.device)),
            "resumed_from": self.resumed_from,
            "answered_from_cache": self.from_cache,
            "replied_first": sum(
                r.engine.deferred_updates for r in self.book.runs.values() if r.engine
            ),
        }

    def status(self) -> dict[str, Any]:
        latest = self.book.latest()
        return {
            **super().status(),
            "topology": self.cfg.server.topology,
            "steps_applied": self.steps_applied,
            "last_loss": self.last_loss,
            "current_run": latest.key if latest else None,
            "runs": [r.info() for r in list(self.book.runs.values())[-5:]],
        }

    # ---- peers ---------------------------------------------------------------------------
    def accept(self, hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        """The welcome carries the run and where it stands for the client (the resume exchange)."""
        name = self.peer_name(hello, key)
        group = self.group_of(name)  # the runs it may see (its group's alone), its places
        welcome = super().accept(hello, key)
        wanted = str(hello.get("run") or "")
        if wanted:
            try:
                check_run_id(wanted, "client.run")
            except ConfigError as exc:
                raise ProtocolError(exc.message) from None
        bound = self.book.runs.get(self.peer_runs.get(name, ""))
        check_name_free(self.peers.values(), name, hello, self.cfg.server.takeover_after_s, bound)
        if bound is None or not bound.active or wanted not in ("", bound.id) or name in bound.done:
            self.peer_runs.pop(name, None)
            bound = self.book.find(group, wanted) if wanted else self._current_run(name)
        if bound is not None and self.restarts_a_stalled_run(name, hello, bound):
            bound = None  # it ended: the relay's next step starts a new run
            self.peer_runs.pop(name, None)
        if hello.get("intent", "train") == "train":
            if bound is not None and not bound.active:
                raise ProtocolError(
                    f"run {wanted!r} has {bound.state}; name a new run ([client] run) to train"
                )
            if bound is not None:  # else the run starts with its first training message
                self.peer_runs[name] = bound.key
        self.requested[name] = wanted
        if hello.get("intent", "train") == "train":
            self.inferring.discard(name)
        else:
            self.inferring.add(name)
        relay = name in self.cfg.server.relays  # its clients train (relay-1/client-1), not it
        self.clients.joined(name, training=name not in self.inferring and not relay)
        last = bound.replies.newest(name, Kind.FORWARD.value) if bound else None
        behind = hello.get("for")  # a relay asking about one of its clients (relay-1/client-1)
        if isinstance(behind, str) and behind and name in self.cfg.server.relays:
            welcome["finished"] = bound is not None and f"{name}/{behind}" in bound.done
        return {
            **welcome,
            "topology": self.cfg.server.topology,
            "applied": list(last) if last else None,
            # the run it trains in; a new one's id is the one it will most likely get
            "run": bound.id if bound else (wanted or self.book.next_id(group)),
            # a client keeps undo points for what a crash between checkpoints may lose
            "checkpoint_every": max(1, self.cfg.checkpoint.every_steps) if self.ckpt else 1,
        }

    def forget_peer(self, peer: Peer) -> None:
        self.clients.left(peer.name)
        run = self.book.runs.get(self.peer_runs.get(peer.name, ""))
        if run is not None and run.engine is not None:
            self.came_due(run, run.engine.forget(peer.name))

    def _can_reply_first(self) -> bool:
        """Defer weight gradients past the reply only when it costs nobody anything: no
        checkpoint is due with this step (it must hold the update before the reply leaves)
        and no other request is waiting (the deferred work would delay it)."""
        if not self.cfg.server.reply_first or self.inbox_waiting():
            return False
        due = self.steps_applied + 1 - self._saved_at >= max(1, self.cfg.checkpoint.every_steps)
        return self.ckpt is None or not due

    def after_replies(self) -> None:
        self._settle()

    def _settle(self) -> None:
        engine, self._settle_next = self._settle_next, None
        if engine is not None:
            engine.settle()
        for run in self.book.runs.values():  # the digests of the requests just answered
            run.replies.settle()

    async def dispatch(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        self._settle()  # no request ever sees weights without the last update
        try:
            msg = msg.spoken_by(self.speaker(peer, msg))
            if msg.kind in (Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHTS):
                if peer.name in self.inferring and peer.name not in self.peer_runs:
                    return self._infer_side(identity, peer, msg)
                return self._train(identity, peer, msg)
            if msg.kind in (Kind.EVALUATE, Kind.PREDICT):
                return self.evaluate(identity, peer, msg)
            if msg.kind is Kind.HEARTBEAT:
                return [(identity, msg.reply(Kind.HEARTBEAT))]
            if msg.kind is Kind.BYE:
                self._bye(identity, peer, msg)
                return []
            raise ProtocolError(f"a server does not accept {msg.kind.value} messages")
        except ProtocolError as exc:
            if exc.code in QUIET_CODES:
                log.warning("%s: %s", msg.client, exc.message)
            else:
                self.reject(peer, reject_reason(exc), exc)
            retry = isinstance(exc, OverloadedError)
            return [(identity, error_message(exc.code, exc.message, retryable=retry, request=msg))]

    def _infer_side(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        """A peer that joined to infer trains nothing and starts no run: what it may send
        besides EVALUATE/PREDICT (a PSI post to align rows first) goes to the engine it
        infers with, so the parties of a vertical predict meet the trained model."""
        engine = self._inference_engine(peer)
        if not engine.relays_only(msg):
            raise ProtocolError(
                f"{peer.name} joined to infer (its hello said so) and cannot send "
                f"{msg.kind.value} messages; start it with epochs left to train"
            )
        return engine.handle(identity, msg)

    def _bye(self, identity: bytes, peer: Peer, msg: Message) -> None:
        run = self.book.runs.get(self.peer_runs.get(peer.name, ""))
        open_in = run is not None and run.active and msg.client in run.members - run.done
        if run is not None and open_in and msg.meta.get("finished"):
            self.finish_part(run, msg.client, msg.meta.get("accuracy"))
        if msg.client == peer.name:  # a relay's client leaving is not the relay leaving
            log.info("client %s said bye after %d steps", peer.name, peer.applied)
            self.forget(identity)
        else:
            self.clients.left(msg.client)

    def _train(self, identity: bytes, peer: Peer, msg: Message) -> Replies:
        """Apply a step at most once: a retransmitted request gets the cached reply."""
        run = self._training_run(peer, self._starter(identity, peer, msg))
        if msg.client in run.done:  # its replies there are not answers to a new run's steps
            raise RunEndedError(finished_message(msg.client, peer.name, run.key))
        step, engine = (msg.epoch, msg.step), self.engine_of(run)
        self.came_due(run, engine.at(time.monotonic()))  # the engine's clock, before the step
        cached = self.cached_reply(run, engine, msg)
        if cached is not None:
            log.info("%s resent %s %s: answering from cache", msg.client, msg.kind.value, step)
            self.from_cache += 1
            return [(identity, cached)]
        newest = run.replies.newest(msg.client, msg.kind.value)
        if msg.kind is Kind.FORWARD and newest is not None and step < newest:
            raise StaleStepError(
                f"step {step} is older than the steps run {run.id} applied for {msg.client} "
                f"(up to {newest}): it started again without its state; resume it from its "
                f"checkpoint ([checkpoint] dir), else stop that run (`sl-pipeline runs stop "
                f"{run.key}`, its model is saved) and start it again"
            )
        self._track(run, msg)
        before = engine.steps_applied
        engine.defer_updates = self._can_reply_first()
        self._settle_next = engine
        start = time.perf_counter()
        replies = engine.handle(identity, msg)
        self.metrics.server_compute_seconds.observe(time.perf_counter() - start)
        self.metrics.queue_depth.set(engine.queue_depth())
        self.metrics.epoch.set(msg.epoch + 1)
        self.file_replies(run, replies, msg)
        applied = engine.steps_applied - before
        if applied:
            self._count_applied(run, peer, replies, applied, engine)
        if self._versions() != self._saved_versions:
            self.checkpoint()  # a turn or a round moved on: durable before anyone hears of it
        return replies

    def _track(self, run: Run, msg: Message) -> None:
        """A new member of the run, or a member's new epoch (logged once per epoch)."""
        if msg.client not in run.members:
            self.book.check_join(run, msg.client)
            check_room(run, msg.client, self.cfg.server.max_names)
            run.members.add(msg.client)
            self.clients.started(msg.client, connected=True)
        if msg.kind is Kind.FORWARD and run.epochs.get(msg.client, -1) < msg.epoch:
            run.epochs[msg.client] = msg.epoch
            loss = "n/a" if run.last_loss is None else f"{run.last_loss:.4f}"
            log.info(
                "run %s: %s is in epoch %d (%d steps applied in the run, last loss %s)",
                run.key,
                msg.client,
                msg.epoch + 1,
                run.steps,
                loss,
            )

    def _count_applied(
        self, run: Run, peer: Peer, replies: Replies, applied: int, engine: Engine
    ) -> None:
        for _, r in replies:
            if r.kind is Kind.BACKWARD:
                run.applied_log.append(r.client, r.epoch, r.step)
                run.client_steps[r.client] = run.client_steps.get(r.client, 0) + 1
                self.clients.stepped(r.client, run.client_steps[r.client], r.epoch)
        peer.applied += 1
        run.steps += applied
        run.last_active = time.monotonic()
        self.steps_applied += applied
        self.metrics.record_step(self.steps_applied)
        if engine.last_loss is not None:
            run.last_loss = engine.last_loss
            self.metrics.train_loss.set(run.last_loss)
        self.report_run(run)
        if self.steps_applied - self._saved_at >= max(1, self.cfg.checkpoint.every_steps):
            self.checkpoint()  # before any reply leaves: what a client saw is durable
