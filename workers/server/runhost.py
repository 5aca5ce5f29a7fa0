"""The server's side of training runs: which run a peer trains in, each run's engine and
saved model, and one live session per client name (see :mod:`workers.server.runs`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sl_pipeline.config import ServerConfig, resolve_path
from sl_pipeline.errors import START_AGAIN, ProtocolError, RunEndedError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.tenancy import ONE_GROUP, Groups
from sl_pipeline.zmtp_router import ZmtpRouter
from workers.ops.clientseries import ClientSeries
from workers.ops.metrics import WorkerMetrics
from workers.runtime.appliedlog import AppliedLog
from workers.runtime.hellorates import HelloRates
from workers.runtime.peers import Peer, PeerTable
from workers.runtime.savedmodel import save_weights
from workers.server.engines.base import Engine, Reply
from workers.server.replycache import MIB, ReplyCache
from workers.server.retiring import Retiring
from workers.server.runs import FINISHED, STOPPED, Run, RunBook
from workers.server.runstarts import starter_of
from workers.server.savedmodels import SavedModels
from workers.topologies import topology

log = logging.getLogger("sl_pipeline.server")


class RunHost(SavedModels, Retiring):
    """Mixed into the server worker: the runs it hosts and the peers that train in them."""

    cfg: ServerConfig
    base: Path
    metrics: WorkerMetrics
    clients: ClientSeries  # per-client series
    peers: dict[bytes, Peer]
    groups: Groups  # who may train with whom ([server] groups)
    peer_runs: dict[str, str]  # peer name -> the run it trains in (its qualified id)
    requested: dict[str, str]  # peer name -> the run it asked for ("" = current)
    inferring: set[str]  # peers whose hello said they only infer
    _spare: Engine | None  # the first run's engine, or inference's before any run
    _spare_trained: bool
    due_replies: list[Reply]  # came due outside a request: sent after the next replies
    _endpoint: ZmtpRouter | None  # the listening router (RouterService's)

    def group_of(self, name: str) -> str:
        """The group of peer ``name`` (an admitted name: a relay speaks for its clients)."""
        group = self.groups.group_of(name)
        if group is None:  # only --insecure names can be in none: admitted ones are checked
            raise ProtocolError(
                f"{name} is in no group of [server] groups, so it may train in no run here; "
                "add it to its project's group"
            )
        return group

    def open_book(self, table: PeerTable, hellos: HelloRates) -> RunBook:
        """The book of runs; each group's own places (peers, runs) and bucket of hellos,
        so that what one group holds or sends never takes another's (Groups.shares)."""
        groups, book = self.groups, RunBook.for_server(self._runs_dir(), self.cfg.server)
        table.group_of = lambda name: groups.group_of(name) or ONE_GROUP
        table.places = groups.shares(self.cfg.server.max_clients, "max_clients")
        book.run_places = groups.shares(self.cfg.server.max_runs, "max_runs")
        self.folders = self.open_folders(book)
        if groups.several:
            hellos.group_of = lambda key: groups.group_of(table.admitted_names.get(key, ""))
        return book

    def _current_run(self, name: str) -> Run | None:
        """Where a client that names no run trains: the run of its group it has open (a
        restart, also of this server, which forgot its binding), else the current ``run-N``."""
        group = self.group_of(name)
        mine = self.book.open_run_of(name)
        if mine is not None and mine.group == group:
            return mine
        return self.book.current_for(name, group)

    def build_engine(self) -> Engine:
        """A run's engine, fresh from the model's seed, reporting its bounded tables."""
        engine = topology(self.cfg.server.topology).engine(self.cfg, self.base)
        engine.on_bound = self.metrics.record_bound
        return engine

    def new_replies(self) -> ReplyCache:
        return ReplyCache(
            max_names=max(1, self.cfg.server.max_names),
            on_hit=lambda: self.metrics.record_bound("reply_cache"),
            max_bytes=max(1, self.cfg.server.reply_cache_mib) * MIB,
            on_bytes_hit=lambda: self.metrics.record_bound("reply_cache_bytes"),
            checkpoint_bytes=max(0, self.cfg.server.checkpoint_replies_mib) * MIB,
            digests=self.cfg.checkpoint.every_steps > 1,  # only then may a client redo steps
        )

    def _runs_dir(self) -> Path | None:
        s = self.cfg.server
        if s.runs_dir:
            return resolve_path(self.base, s.runs_dir, "server.runs_dir", must_exist=False)
        if s.save:
            return self._save_path().parent / "runs"  # type: ignore[union-attr]
        return None

    @property
    def engine(self) -> Engine:
        """The newest run's engine (before any run: the one a first run will train)."""
        run = self.book.latest()
        if run is not None:
            return self.engine_of(run)
        assert self._spare is not None
        return self._spare

    @property
    def applied_log(self) -> AppliedLog:
        run = self.book.latest()
        return run.applied_log if run else AppliedLog()

    @property
    def last_loss(self) -> float | None:
        run = self.book.latest()
        return run.last_loss if run else None

    def _new_engine(self) -> Engine:
        if self._spare is not None and not self._spare_trained:
            engine, self._spare = self._spare, None
            return engine
        return self.build_engine()

    def engine_of(self, run: Run) -> Engine:
        """A finished run's model is reloaded from its file when it left memory."""
        if run.engine is None:
            engine = self.build_engine()
            if run.model and Path(run.model).exists():
                self._load_model(engine, Path(run.model), f"the saved model of run {run.key}")
            run.engine = engine
            self.book.drop_old_engines(keep=run)  # predicting on each old run held them all
        return run.engine

    def _add_record(self, info: dict[str, Any], source: str = "") -> Run:
        run = self.book.add_record(info, None, source)
        run.engine = None
        if run.active and run.model and Path(run.model).exists():
            self.engine_of(run)  # an interrupted run continues from its last saved weights
        self.report_run(run)
        return run

    def _training_run(self, peer: Peer, starter: str) -> Run:
        """The run this peer's training message belongs to; a new one (started by this
        message, never by a hello, and counted as one of ``starter``'s starts) when none
        fits."""
        run = self.book.runs.get(self.peer_runs.get(peer.name, ""))
        if run is None:
            group, wanted = self.group_of(peer.name), self.requested.get(peer.name, "")
            run = self.book.find(group, wanted) if wanted else self._current_run(peer.name)
            if run is None:  # another group's run of that id is none: this group's starts
                run_id = wanted or self.book.next_id(group)
                run = self._start_run(run_id, peer.name, group, starter or peer.name)
            self.peer_runs[peer.name] = run.key
        if not run.active:
            raise RunEndedError(
                f"run {run.id!r} has {run.state}; {START_AGAIN} (or name one with [client] run)"
            )
        return run

    def file_replies(self, run: Run, replies: list[Reply], msg: Message | None = None) -> None:
        """Keep ``run``'s replies for resends, each under the request it names (also another
        client's: a vertical part, a round-robin turn, a queued step); ``msg`` is the request
        answered (its own reply keeps it, for its digest); None for replies that came due."""
        asked = None if msg is None else (msg.client, msg.kind, (msg.epoch, msg.step))
        for _, reply in replies:
            answered = reply.answers or (msg.kind if msg else None)
            if reply.kind is Kind.ERROR or answered is None:
                continue
            at = (reply.epoch, reply.step)
            own = (reply.client, answered, at) == asked
            run.replies.put(reply.client, answered.value, at, reply, msg if own else None)

    def came_due(self, run: Run, replies: list[Reply]) -> None:
        """Replies ``run``'s engine gave outside a request: kept for resends, sent soon."""
        self.file_replies(run, replies)
        self.due_replies.extend(replies)

    def due(self) -> list[Reply]:
        """What came due: each active run's engine told the time (a u-shaped step held too
        long is abandoned, a waiting forward served), and what leaving clients freed."""
        now = time.monotonic()
        self.retire_aged(now)
        for run in self.book.active():
            if run.engine is not None:
                self.came_due(run, run.engine.at(now))
        due, self.due_replies = self.due_replies, []
        return due

    def cached_reply(self, run: Run, engine: Engine, msg: Message) -> Message | None:
        """The reply cached for a resent ``msg``, where its step's state still stands (a
        u-shaped output whose open step was abandoned does not: the forward runs again)."""
        step = (msg.epoch, msg.step)
        cached = run.replies.get(msg.client, msg.kind.value, step, msg)
        if cached is None:
            return None
        applied = run.replies.get(msg.client, Kind.BACKWARD.value, step) is not None
        return cached if engine.replays(msg, applied) else None

    def report_run(self, run: Run) -> None:
        """The run's series: steps, active, last loss, the accuracy its clients reported."""
        self.metrics.record_run(run.key, run.steps, run.active, run.last_loss, run.test_accuracy)

    def _starter(self, identity: bytes, peer: Peer, msg: Message) -> str:
        """Whose starts a run this message starts counts against (``runstarts``)."""
        address = self._endpoint.address_of(identity) if self._endpoint is not None else "?"
        return starter_of(peer.name, peer.key, msg.client, self.cfg.server.relays, address)

    def _start_run(self, run_id: str, owner: str = "", group: str = "", starter: str = "") -> Run:
        now = time.monotonic()
        mine = self.book.owned_run(owner) if owner else None
        if mine is not None and self.book.idle(mine, now):
            self._give_up(mine)  # its owner's earlier run, which only waited for more clients
        self.check_start(run_id, owner, group)
        if starter:  # before the engine is built: a refused start costs the server nothing
            self.book.starts.check(starter, now)
        if self.book.full(group):  # empty or idle runs of the group's places give way
            for gone in self.book.expire_empty(now, group):
                self.metrics.record_bound("empty_runs")
                self.report_run(gone)
        if self.book.full(group):
            for idle in self.book.idle_runs(now, group)[:1]:
                self._give_up(idle)
        run = self.book.start(run_id, self._new_engine(), self.new_replies(), owner, group)
        if starter:
            self.book.starts.took(starter, now)
        self.report_run(run)
        return run

    def _inference_engine(self, peer: Peer) -> Engine:
        """Evaluation and prediction: the peer's run, the run it names, else its group's
        newest (never another group's: a run it may not join is one that does not exist)."""
        group, key = self.group_of(peer.name), self.peer_runs.get(peer.name, "")
        name = self.requested.get(peer.name, "")
        if key or name:
            run = self.book.runs.get(key) if key else self.book.find(group, name)
            if run is None:
                raise ProtocolError(
                    f"no run {name or key!r} on this server; `runs list` shows them"
                )
        elif (run := self.book.latest(group)) is None:
            if self.groups.several:  # the spare may hold server.save: any group's model
                raise ProtocolError(f"no run of {peer.name}'s group on this server yet")
            return self.engine
        return self.engine_of(self.kept(run))

    def evaluate(self, identity: bytes, peer: Peer, msg: Message) -> list[Reply]:
        """Answer an evaluation or prediction. Where the server holds the labels (vertical)
        it scores the evaluation itself, and the figure is its own: the run's accuracy (as
        ``server`` among the clients'), its metrics and its log; the parties are told none."""
        engine = self._inference_engine(peer)
        member = peer.name in self.peer_runs or peer.name not in self.inferring
        if msg.kind is Kind.PREDICT and member and not engine.predicts_for_members:
            # a member's PREDICT parts of its evaluation batches would fetch the fused
            # outputs of labelled rows (the label AUC ~1), which EVALUATE keeps from it
            raise ProtocolError(
                f"{peer.name} trains in a run here and gets no predictions; run "
                "`sl-pipeline predict` (it joins to infer) for them"
            )
        replies = engine.evaluate(identity, msg)
        run = self.book.runs.get(self.peer_runs.get(peer.name, ""))
        if msg.kind is Kind.EVALUATE and run is not None and engine.test_accuracy is not None:
            run.accuracies["server"] = engine.test_accuracy
            self.metrics.test_accuracy.set(engine.test_accuracy)
            self.report_run(run)
        return replies

    def save_models(self, runs: list[Run]) -> None:
        """Each run's model in its own folder, and the newest run's as ``server.save``
        (a run ending, or the server stopping with runs still active)."""
        for run in runs:
            engine = self.engine_of(run)
            engine.settle()
            path = self.book.model_path(run)
            if path is not None and run.steps:
                save_weights(engine.model.state_dict(), path, f"run {run.id}'s model")
                run.model = str(path)
        latest = self.book.latest()
        if latest is not None and latest.steps:
            self._save_latest(self.engine_of(latest), latest.key)

    def end_run(self, run: Run, state: str = FINISHED) -> None:
        """Save the run's model, record it as ended and checkpoint that."""
        self.save_models([run])
        if state == STOPPED:  # their part of it is over: a member it lost is lost no more
            for name in sorted(run.members - run.done):
                self.clients.part_over(name)
        gone = self.book.end(run, state, self.bound_runs())
        # a stopped run's clients stay bound to it: their next step is refused (run_ended),
        # never the first step of a new run (one client went on silently in run-2 and
        # reported its 2,400 steps in run-1, which had applied 332)
        for name in [n for n, r in self.peer_runs.items() if r == run.key and state != STOPPED]:
            del self.peer_runs[name]
        self.report_run(run)
        self.checkpoint(force=True)
        self.folders.forgotten(gone)  # once no record on disk names them
        info = run.info()
        loss = "n/a" if run.last_loss is None else f"{run.last_loss:.4f}"
        accuracy = "n/a" if run.test_accuracy is None else f"{run.test_accuracy:.4f}"
        log.info(
            "run %s %s: %d steps by %s in %.1fs, last loss %s, test accuracy %s; model %s",
            run.key,
            state,
            run.steps,
            ", ".join(info["clients"]) or "no client",
            info["duration_s"],
            loss,
            accuracy,
            run.model or "not saved (set server.save or server.runs_dir)",
        )

    def finish_part(self, run: Run, client: str, accuracy: Any) -> None:
        """``client`` said it finished its part of ``run``: the run ends once enough did;
        until then the finish is checkpointed at once (a server restored without it bound
        the client to this run again, and fed it the run's cached replies as if it trained)."""
        run.done.add(client)
        run.last_active = time.monotonic()
        if not isinstance(accuracy, float) or not 0.0 <= accuracy <= 1.0:
            accuracy = None  # none measured (no labels here), or not a ratio at all
        else:
            run.accuracies[client] = accuracy
        self.clients.done(client, accuracy)
        self.report_run(run)
        log.info("%s finished its part of run %s", client, run.key)
        if self.book.ready_to_finish(run):
            self.end_run(run)
        else:
            self.book.write_index()
            self.checkpoint(force=True)

    def restarts_a_stalled_run(self, relay: str, hello: dict[str, Any], run: Run) -> bool:
        """A relay asks about a client of its that finished its part of ``run`` and starts
        again, while the run still waits for another client: a relay trains one run at a
        time, so where the run is idle (``server.stalled_run_s``: that client vanished) it
        gives its place up here, and the relay's next step starts a new run instead of being
        refused. Not idle: the run goes on, and the step is refused (``run_ended``)."""
        behind = hello.get("for")
        if not (isinstance(behind, str) and behind and relay in self.cfg.server.relays):
            return False
        if f"{relay}/{behind}" not in run.done or not self.book.idle(run, time.monotonic()):
            return False
        self._give_up(run)
        return True

    def _give_up(self, run: Run) -> None:
        """An idle run (see ``RunBook.idle``) ends: stopped, its model saved."""
        quiet = time.monotonic() - run.last_active
        waiting = len(run.members - run.done)
        if waiting:  # a member vanished: server.stalled_run_s
            log.warning(
                "run %s gave its place up: no client stepped or finished in it for %.0fs "
                "(server.stalled_run_s); %d of its clients have not finished",
                *(run.key, quiet, waiting),
            )
        else:
            log.warning(
                "run %s gave its place up: its %d client(s) finished and it waited %.0fs "
                "for server.run_clients = %d",
                *(run.key, len(run.members), quiet, self.book.run_clients),
            )
        self.metrics.record_bound("idle_runs")
        self.end_run(run, STOPPED)

    def stop_run(self, key: str, group: str | None = None) -> Run:
        """Stop run ``key`` (for a group's token: of that group only)."""
        run = self.book.get(key, group)
        if run.active:
            log.warning("run %s stopped by %s", run.key, "an operator" if group is None else group)
            self.end_run(run, STOPPED)
        return run
