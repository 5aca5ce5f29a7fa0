"""The server's side of ended runs' retention (:mod:`workers.server.retention`): when the
book forgets ended runs and their folders go: at start, when a run ends, and once a minute
on a server that keeps runs for a time (``server.keep_ended_for_s``)."""

from __future__ import annotations

import logging
from pathlib import Path

from sl_pipeline.errors import ProtocolError, RunEndedError
from sl_pipeline.tenancy import qualify
from workers.ops.metrics import WorkerMetrics
from workers.runtime.peers import Peer
from workers.server.retention import RETIRE_EVERY_S, RunFolders
from workers.server.runs import KEEP_ENGINES, Run, RunBook

log = logging.getLogger("sl_pipeline.server")


class Retiring:
    """Mixed into the server worker, beside :class:`workers.server.runhost.RunHost`."""

    book: RunBook
    folders: RunFolders
    metrics: WorkerMetrics
    peer_runs: dict[str, str]  # peer name -> the run it trains in (its qualified id)
    peers: dict[bytes, Peer]  # the live sessions

    def checkpoint(self, force: bool = False) -> None:
        raise NotImplementedError

    def open_folders(self, book: RunBook) -> RunFolders:
        """The runs folder's ended runs; the book numbers no run-N a removed run had."""
        folders = RunFolders(book.dir, book.retention)
        folders.on_removed = lambda: self.metrics.record_bound("ended_runs")
        folders.on_disk()
        book.floor = folders.numbers
        return folders

    def check_start(self, run_id: str, owner: str, group: str) -> None:
        """Whether ``owner`` may start run ``run_id`` of ``group``: not one whose files were
        removed (its client, resuming from its checkpoint, trained on fresh weights)."""
        gone = self.folders.gone(qualify(group, run_id), group) if owner else None
        if gone is not None:
            raise RunEndedError(f"{gone}; to train again, name a new run ([client] run)")
        self.book.check_start(run_id, owner, group)

    def keep_listed(self, listed: dict[str, Run]) -> None:
        """Ended runs the runs list holds and the checkpoint just restored does not (an
        older one: a backup put back) stay listed, and so keep their folders."""
        ended = [(k, r) for k, r in listed.items() if not r.active and k not in self.book.runs]
        runs = [*ended, *self.book.runs.items()]
        self.book.runs = dict(sorted(runs, key=lambda kr: kr[1].started))  # in start order

    def bound_runs(self) -> set[str]:
        """Runs a client with a live session is bound to (a stopped run's clients are
        refused from it, never moved to a new one): none is forgotten while so. A binding
        outlives its session, but the name's next hello drops one to an ended run, so one
        of a name that left pins nothing (every name stopped in its run pinned its run)."""
        live = {p.name for p in self.peers.values()}
        return {run for name, run in self.peer_runs.items() if name.split("/")[0] in live}

    def kept(self, run: Run) -> Run:
        """``run``, whose model is in memory or in its file: an ended run's that is in
        neither (no runs folder: the newest KEEP_ENGINES ended runs keep theirs in memory
        only; or its file was deleted) is refused, never answered with fresh weights."""
        if run.engine is not None or run.active or not run.steps:
            return run
        if not run.model:
            raise ProtocolError(
                f"run {run.key}'s model was kept in memory only and has left it: without a "
                f"runs folder the server keeps the newest {KEEP_ENGINES} ended runs' models; set "
                "server.runs_dir (or server.save) to keep each run's model in a file"
            )
        if not Path(run.model).exists():
            raise ProtocolError(f"run {run.key}'s model file {run.model} is gone")
        return run

    def retire_at_start(self) -> None:
        """Once the runs list and the checkpoint are read: a run an older checkpoint still
        lists though it was removed stays removed, the policy applies (a restart after a
        long stop, or with a smaller keep), and folders of runs no list knows go."""
        removed = [
            key
            for key, run in self.book.runs.items()
            if not run.active and self.folders.was_removed(key, run.started)
        ]
        for key in removed:
            del self.book.runs[key]
        gone = self.book.retire(set())
        if removed or gone:  # the checkpoint too: a removal it still named came back
            self.book.write_index()
            self.checkpoint(force=True)
        self.folders.forgotten(gone)
        self.folders.sweep(list(self.book.runs.values()))

    def retire_aged(self, now: float) -> None:
        """Ended runs past ``server.keep_ended_for_s`` go, on a server where none ends."""
        if not self.book.retention.keep_for_s or now - self.folders.checked_at < RETIRE_EVERY_S:
            return
        self.folders.checked_at = now
        if (moved := self.book.retention.clock.jumped_s()) is not None:
            log.warning(
                "the wall clock moved %+.0f s against the monotonic clock; ended runs' ages "
                "(server.keep_ended_for_s) count as this server saw them pass, so none goes "
                "early",
                moved,
            )
        self.retired(self.book.retire(self.bound_runs()))

    def retired(self, gone: list[tuple[Run, str]]) -> None:
        """The book forgot ``gone``: written down (the list, the checkpoint), then their
        folders go, so that no record left on disk names a folder that is no more."""
        if gone:
            self.book.write_index()
            self.checkpoint(force=True)
            self.folders.forgotten(gone)
