"""Training runs on a long-lived server: which run a client trains in, and what each keeps.

A server process hosts runs one after another, or several at once: each run has an id, its
own engine (model and optimizer, built fresh from the model's seed), its own reply cache
(so a new run's step (0, 0) is never "older than the steps this server remembers"), its own
applied-step log and, once it ends, its own saved model. Runs never share state, so a run
that starts while another is active is isolated from it; ``max_runs`` bounds how many are
active at once (a client asking for one more is refused as ``overloaded`` and retries,
which queues it).

A client names its run (``[client] run``) or takes the server's current one: the newest
active ``run-N`` it has not already finished (never a run another client named), else a new
run with the next ``run-N`` id (a client cannot start a run of that form under its own name).
A run starts on its first training message, never on a hello; a client has at most one open
run (one it started or trained in and has not finished) and has started at most one active
run (finished by it or not: a client that asks for another waits, as ``overloaded``); a run
with no applied step gives its place up ``empty_run_s`` after it started, a run whose
every client finished gives it up ``empty_run_s`` after its last step or finish, and a run
in which no client stepped or finished for ``stalled_run_s`` (a member vanished) gives it up,
when a new run needs it or the client that started it asks for a new one. So one admitted
client holds at most one of the ``max_runs`` places and cannot draw others into a run it
named; and it starts at most ``run_starts_per_min`` runs a minute (after a burst of as
many), as each run that ends costs the server a saved model and fsynced checkpoints. A run ends when
``run_clients`` of its clients (every client that trained in it, when 0) said they
finished, or when an operator stops it.

On a server with ``[server] groups`` each run belongs to the group of the client that
started it, and every lookup by a client's run id is within that client's group
(:mod:`sl_pipeline.tenancy`): the book keys runs by their qualified id ``GROUP:RUN``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sl_pipeline.config import ServerSection
from sl_pipeline.errors import OverloadedError, ProtocolError
from sl_pipeline.runid import SERVER_RUN_ID, check_run_id
from sl_pipeline.tenancy import ONE_GROUP, qualify
from workers.runtime.appliedlog import AppliedLog
from workers.server.engines.base import Engine
from workers.server.replycache import ReplyCache
from workers.server.retention import KEEP_ENDED, Retention
from workers.server.runindex import ACTIVE, FINISHED, STOPPED, read_index, run_fields
from workers.server.runstarts import RunStarts

log = logging.getLogger("sl_pipeline.server")

KEEP_ENGINES = 3  # finished runs whose model stays in memory (older ones reload from disk)


def one_open_run(client: str, run_id: str) -> str:
    return (
        f"{client} already trains in run {run_id!r} and has not finished it; a client has one "
        f"open run at a time: finish it, or stop it on the server (`sl-pipeline runs stop "
        f"{run_id}`)"
    )


@dataclass
class Run:
    id: str
    engine: Engine | None
    replies: ReplyCache = field(default_factory=ReplyCache)
    state: str = ACTIVE
    members: set[str] = field(default_factory=set)  # clients that trained in it
    done: set[str] = field(default_factory=set)  # clients that said they finished
    steps: int = 0
    applied_log: AppliedLog = field(default_factory=AppliedLog)  # which steps it applied
    started: float = field(default_factory=time.time)
    ended: float | None = None
    ended_mono: float | None = None  # when it ended, where this process saw it end
    last_loss: float | None = None
    model: str = ""  # where its saved model lies, once saved
    epochs: dict[str, int] = field(default_factory=dict)  # each client's newest epoch (0-based)
    client_steps: dict[str, int] = field(default_factory=dict)  # steps applied per client
    accuracies: dict[str, float] = field(default_factory=dict)  # what finished clients reported
    owner: str = ""  # the peer whose training message started it
    opened: float = field(default_factory=time.monotonic)  # when its first message came
    last_active: float = field(default_factory=time.monotonic)  # its last step or finish
    group: str = ONE_GROUP  # whose members alone may train in it ([server] groups)

    @property
    def key(self) -> str:
        """Its id on this server: ``GROUP:RUN`` where groups are configured."""
        return qualify(self.group, self.id)

    @property
    def named(self) -> bool:
        """Named by a client (``[client] run``), not one of the server's ``run-N``."""
        return SERVER_RUN_ID.fullmatch(self.id) is None

    @property
    def test_accuracy(self) -> float | None:
        """The mean test accuracy its clients reported on finishing (None until one did)."""
        if not self.accuracies:
            return None
        return sum(self.accuracies.values()) / len(self.accuracies)

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def info(self) -> dict[str, Any]:
        """What ``runs list`` and ``runs status`` show (JSON-able, no tensors)."""
        end = self.ended if self.ended is not None else time.time()
        return {
            "id": self.key,
            **({"group": self.group} if self.group else {}),
            "state": self.state,
            "clients": sorted(self.members),
            "finished_clients": sorted(self.done),
            "steps": self.steps,
            "last_loss": self.last_loss,
            "test_accuracy": self.test_accuracy,
            "accuracies": dict(sorted(self.accuracies.items())),
            "started": self.started,
            "ended": self.ended,
            "duration_s": round(end - self.started, 3),
            "model": self.model,
        }

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint form: an active run's engine and cache; an ended run's record (and, for
        the newest, the applied-step log)."""
        out: dict[str, Any] = {**self.info(), "members": sorted(self.members)}
        out["done"], out["owner"] = sorted(self.done), self.owner  # its rules outlive a restart
        # sl_client_steps counts on after a restart (it restarted at 0: 1,154 of 3,450 steps)
        out["client_steps"], out["epochs"] = dict(self.client_steps), dict(self.epochs)
        if self.active and self.engine is not None:
            out["engine"] = self.engine.state_dict()
            out["replies"] = self.replies.entries()
        if self.applied_log:  # kept for the newest runs only (see RunBook.end)
            out["applied_log"] = self.applied_log.state()
        return out


class RunBook:
    """Every run this server hosts, in start order; the newest last."""

    def __init__(
        self,
        runs_dir: Path | None,
        max_runs: int,
        run_clients: int,
        empty_run_s: float = 60.0,
        stalled_run_s: float = 0.0,
    ) -> None:
        self.dir = runs_dir
        self.max_runs = max(1, max_runs)
        self.run_clients = run_clients
        self.empty_run_s = empty_run_s
        self.stalled_run_s = stalled_run_s
        self.runs: dict[str, Run] = {}
        # each group's places among the active runs (Groups.shares); {}: one pool of max_runs
        self.run_places: dict[str, int] = {}
        self.retention = Retention()  # which ended runs it keeps (server.keep_ended_*)
        self.floor: dict[str, int] = {}  # each group's highest run-N removed: never reused
        self.starts = RunStarts()  # each client's run starts (server.run_starts_per_min)

    # ---- lookup --------------------------------------------------------------------------
    @classmethod
    def for_server(cls, runs_dir: Path | None, server: ServerSection) -> RunBook:
        """The book of a server with these ``[server]`` settings."""
        bounds = (server.max_runs, server.run_clients, server.empty_run_s, server.stalled_run_s)
        book = cls(runs_dir, *bounds)
        book.retention = Retention.for_server(server)
        book.starts = RunStarts(server.run_starts_per_min)
        return book

    def latest(self, group: str | None = None) -> Run | None:
        """The newest run (of ``group``, unless None)."""
        runs = (r for r in reversed(self.runs.values()) if group in (None, r.group))
        return next(runs, None)

    def find(self, group: str, run_id: str) -> Run | None:
        """Run ``run_id`` as a member of ``group`` sees it: another group's is none."""
        return self.runs.get(qualify(group, run_id))

    def active(self) -> list[Run]:
        return [r for r in self.runs.values() if r.active]

    def current_for(self, name: str, group: str = ONE_GROUP) -> Run | None:
        """The run a client of ``group`` without a run name trains in: the group's newest
        active ``run-N`` it has not finished itself (a run some client named is joined by
        its name only); None means a new run."""
        for run in reversed(self.runs.values()):
            if run.group == group and run.active and not run.named and name not in run.done:
                return run
        return None

    def open_run_of(self, name: str) -> Run | None:
        """The active run ``name`` started or trains in and has not finished, if any."""
        for run in self.active():
            if name not in run.done and (run.owner == name or name in run.members):
                return run
        return None

    def owned_run(self, name: str) -> Run | None:
        """The active run ``name`` started and still answers for (finished by it or not),
        if any. Once ``name`` finished it, a member still training in it holds it open
        instead: that member has no other open run, and the run's place is its one; else a
        member trickling a step now and then (never stalled) held ``name`` off any new run."""
        return next((r for r in self.active() if r.owner == name and not self.held(r)), None)

    @staticmethod
    def held(run: Run) -> bool:
        """Held open by members other than its owner: the owner finished, they have not."""
        return run.owner in run.done and bool(run.members - run.done - {run.owner})

    def idle(self, run: Run, now: float) -> bool:
        """It may give its place up: every client that trained in it finished
        ``empty_run_s`` ago or more (it only waits for ``run_clients`` to be reached), or no
        client stepped or finished in it for ``stalled_run_s`` (a member vanished)."""
        quiet = now - run.last_active
        waiting = bool(run.members) and run.members <= run.done
        stalled = 0 < self.stalled_run_s <= quiet
        return run.active and ((waiting and quiet >= self.empty_run_s) or stalled)

    def idle_runs(self, now: float, group: str = ONE_GROUP) -> list[Run]:
        """Idle runs that hold ``group``'s places (another group's runs give none of theirs)."""
        return [r for r in self.pool(group) if self.idle(r, now)]

    def get(self, key: str, group: str | None = None) -> Run:
        """Run ``key`` (a qualified id) for the operator, or for a group's token (``group``:
        another group's run is one that does not exist, named in no answer)."""
        run = self.runs.get(key)
        if run is None or group not in (None, run.group):
            seen = [k for k, r in self.runs.items() if group in (None, r.group)]
            known = ", ".join(seen[-5:]) or "none yet"
            raise ProtocolError(f"no run {key!r} on this server (latest runs: {known})")
        return run

    def next_id(self, group: str = ONE_GROUP) -> str:
        """The next ``run-N`` of ``group`` (each group numbers its own runs)."""
        ids = [r.id for r in self.runs.values() if r.group == group]
        numbers = [int(m.group(1)) for i in ids if (m := re.fullmatch(r"run-(\d+)", i))]
        return f"run-{max([*numbers, self.floor.get(group, 0)]) + 1}"  # none removed reused

    def pool(self, group: str = ONE_GROUP) -> list[Run]:
        """The active runs that hold ``group``'s places (its own, if it has places)."""
        return [r for r in self.active() if group not in self.run_places or r.group == group]

    def full(self, group: str = ONE_GROUP) -> bool:
        return len(self.pool(group)) >= self.run_places.get(group, self.max_runs)

    def check_capacity(self, group: str = ONE_GROUP) -> None:
        if not self.full(group):
            return
        places = f"server.max_runs = {self.max_runs}"
        if group in self.run_places:  # its own: server.groups.G.max_runs, or its share
            places = f"group {group}'s places: {self.run_places[group]}"
        raise OverloadedError(
            f"{len(self.pool(group))} runs are active ({places}); this run waits until one ends"
        )

    # ---- changes -------------------------------------------------------------------------
    def check_join(self, run: Run, client: str) -> None:
        """Whether ``client`` may train in ``run`` (new to it): not while another run is
        open for it, or one key could hold every place open by trickling steps in each."""
        other = self.open_run_of(client)
        if other is not None and other is not run:
            raise ProtocolError(one_open_run(client, other.key))

    def check_start(self, run_id: str, owner: str, group: str = ONE_GROUP) -> None:
        """Whether ``owner`` may start run ``run_id`` of ``group`` now (a ``ProtocolError``
        says why not)."""
        if owner and (other := self.open_run_of(owner)) is not None:
            raise ProtocolError(one_open_run(owner, other.key))
        if owner and (mine := self.owned_run(owner)) is not None:
            need = self.run_clients or len(mine.members)
            raise OverloadedError(
                f"{owner} started run {mine.key!r}, which is still active ({len(mine.done)} of "
                f"{need} clients finished); a client starts one active run at a time: this "
                f"run waits until that one ends (its other clients finish, or `sl-pipeline "
                f"runs stop {mine.key}`) or gives its place up (server.empty_run_s = "
                f"{self.empty_run_s:g} s after its clients all finished, server.stalled_run_s "
                f"= {self.stalled_run_s:g} s after its last step while a client never finishes)"
            )
        if owner and SERVER_RUN_ID.fullmatch(run_id) and run_id != self.next_id(group):
            raise ProtocolError(
                f"run {run_id!r} does not exist, and run-N ids are the server's to give; "
                "name a new run differently, or leave [client] run empty"
            )

    def start(
        self, run_id: str, engine: Engine, replies: ReplyCache, owner: str = "", group: str = ""
    ) -> Run:
        self.check_start(run_id, owner, group)
        self.check_capacity(group)
        run = Run(run_id, engine, replies, owner=owner, group=group)
        self.runs[run.key] = run
        log.info("run %s started by %s", run.key, owner or "the server")
        self.write_index()
        return run

    def expire_empty(self, now: float, group: str = ONE_GROUP) -> list[Run]:
        """Runs (of ``group``'s places) that applied no step within ``empty_run_s`` of their
        start: forgotten, their places freed (however often their clients keep sending steps
        that fail)."""
        gone = [r for r in self.pool(group) if not r.steps and now - r.opened >= self.empty_run_s]
        for run in gone:
            del self.runs[run.key]
            run.state, run.ended, run.ended_mono = STOPPED, time.time(), time.monotonic()
            log.warning("run %s expired: no step applied in %.0fs", run.key, now - run.opened)
        if gone:
            self.write_index()
        return gone

    def ready_to_finish(self, run: Run) -> bool:
        if not run.active:
            return False
        if self.run_clients:
            return len(run.done) >= self.run_clients
        return bool(run.members) and run.members <= run.done

    def end(self, run: Run, state: str, bound: set[str] | None = None) -> list[tuple[Run, str]]:
        """``run`` ended; returns the ended runs the book forgot (``retire``)."""
        run.state, run.ended, run.ended_mono = state, time.time(), time.monotonic()
        run.replies.compact()  # it answers no more retransmissions
        gone = self.retire(bound or set())
        self.write_index()
        return gone

    def retire(self, bound: set[str]) -> list[tuple[Run, str]]:
        """Ended runs whose model is on disk leave memory, and ended runs past what
        ``retention`` keeps (a group's newest, KEEP_ENDED at most) leave the book (runs.json,
        the checkpoint), never one a client is ``bound`` to: no group's churn of runs grows
        what each step's checkpoint writes. Returns them, with why (their folders go next)."""
        ended = [r for r in self.runs.values() if not r.active]
        gone: list[tuple[Run, str]] = []
        for group in {r.group for r in ended}:
            mine = self.retention.expired([r for r in ended if r.group == group])
            gone += [(r, why) for r, why in mine if r.key not in bound]
        for old, _ in gone:
            del self.runs[old.key]
        self.drop_old_engines()
        return gone

    def drop_old_engines(self, keep: Run | None = None) -> None:
        """Ended runs' models past the KEEP_ENGINES newest leave memory (but ``keep``, just
        reloaded to answer a prediction): each reloads from its file when asked again."""
        ended = [r for r in self.runs.values() if not r.active and r is not keep]
        for run in ended[:-KEEP_ENGINES]:
            run.applied_log = AppliedLog()  # without a runs folder its model goes too
            if self.dir is None or (run.model and Path(run.model).exists()):
                run.engine = None

    def model_path(self, run: Run) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / run.group / run.id / "server.pt"  # a group's runs in its folder

    # ---- persistence ---------------------------------------------------------------------
    def write_index(self) -> None:
        """``runs.json`` in the runs folder: what ``runs list`` shows, across restarts."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".runs.json.tmp"
        tmp.write_text(json.dumps([r.info() for r in self.runs.values()], indent=1))
        os.replace(tmp, self.dir / "runs.json")

    def read_index(self) -> list[dict[str, Any]]:
        return [] if self.dir is None else read_index(self.dir / "runs.json")

    def add_record(self, info: dict[str, Any], engine: Engine | None, source: str = "") -> Run:
        """A run known from ``runs.json`` or a checkpoint (engine state loaded by the caller);
        a value of a wrong type is a ConfigError naming the run and ``source``."""
        run_id, fields = run_fields(info, source or "a checkpoint")
        run = Run(run_id, engine, **fields)
        self.runs[run.key] = run
        return run


__all__ = ["ACTIVE", "FINISHED", "KEEP_ENDED", "STOPPED", "Run", "RunBook", "check_run_id"]
