"""Where a client's state goes: periodic checkpoints (``[checkpoint] dir``), or else the
state a graceful stop leaves, so that the same command carries on.

``sl-pipeline init`` and ``provision`` give every client a ``[checkpoint] dir`` (every step):
a client killed without a stop (``kill -9``, the OOM killer, a power cut) resumes from its
newest checkpoint, and resends a step it had sent, which the server answers from its cache.
A config without one still keeps what a graceful stop (SIGTERM/SIGINT, between steps) has in
memory: one file beside ``client.save``, ``NAME.stopped-STEP.ckpt``, in the checkpoint format
(atomic, hashed, safe to load). Either state is resumed from only in the run it was saved in;
a finished run's starts the next run afresh. A client without a dir that was killed restarts
behind the steps the server applied for it: the server's ``stale_step`` refusal then says why
and what to do (:meth:`ClientStore.explain`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sl_pipeline.config import MAX_PIPELINE_DEPTH, ClientConfig, resolve_path
from sl_pipeline.errors import START_AGAIN, ConfigError, PeerError
from workers.runtime.checkpoint import CheckpointStore, open_store

log = logging.getLogger("sl_pipeline.client")


class StopState:
    """One client's stop-state file, opened (and locked) only when one is read or written:
    a client that never stops early leaves no file, and a start with none takes no lock."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name, self.prefix = name, f"{name}.stopped"
        self._store: CheckpointStore | None = None

    def _open(self) -> CheckpointStore:
        if self._store is None:
            where = "client.save's folder"  # no [checkpoint] dir: the stop state is there
            self._store = CheckpointStore(
                self.folder, keep=1, prefix=self.prefix, key=where, owner=self.name
            )
        return self._store

    def _exists(self) -> bool:
        return self.folder.is_dir() and any(self.folder.glob(f"{self.prefix}-*.ckpt"))

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        return self._open().load_latest() if self._exists() else None

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        return self._open().save(state, step)

    def discard_after(self, step: int) -> list[Path]:
        return self._open().discard_after(step) if self._exists() else []

    def clear(self) -> None:
        """The run it belonged to is finished: a later start trains afresh."""
        self.discard_after(-1)

    def release(self) -> None:
        if self._store is not None:
            self._store.release()


class ClientStore:
    """The client's state store: periodic checkpoints when ``[checkpoint] dir`` is set
    (saved every ``every_steps`` steps, at a stop and at the end), else a :class:`StopState`
    (saved at a stop only, removed at the end of its run). Either is resumed from only in
    the run it was saved in; a finished run's state starts the next run afresh."""

    def __init__(self, cfg: ClientConfig, base: Path) -> None:
        name = cfg.client.name
        # predict (no epochs) trains nothing: it neither reads, writes nor locks a checkpoint
        self.periodic = open_store(cfg.checkpoint, base, name) if cfg.train.epochs > 0 else None
        self.every = max(1, cfg.checkpoint.every_steps)
        self.epochs = cfg.train.epochs
        # Only beside a saved model: a client that keeps nothing (an audit's, with
        # client.save = "") neither leaves a state nor resumes from the deployment's.
        # predict (no epochs) neither resumes from a stop state nor removes one.
        save = cfg.client.save
        stops = self.periodic is None and cfg.train.epochs > 0 and bool(save)
        folder = resolve_path(base, save, "client.save", must_exist=False).parent
        self.on_stop = StopState(folder, name) if stops else None
        self.resumed_in = ""  # the run of the state this client resumed from

    def restore(self, wanted_run: str) -> tuple[dict[str, Any], Path] | None:
        """The state to resume from: the newest checkpoint, or the stop state, when this
        client trains the run it was saved in (``wanted_run`` empty: the server's choice)."""
        store = self.periodic or self.on_stop
        found = store.load_latest() if store is not None else None
        if found is None:
            return None
        run = str(found[0].get("run", ""))
        if found[0].get("finished") or int(found[0]["epoch"]) >= self.epochs:
            # Its run finished: the same command trains a new run (it did nothing, 0 steps)
            log.info("%s is the end of run %s: training a new run from the start", found[1], run)
            self.clear()
            return None
        # Another run named (client.run): a stop state waits for its own run; checkpoints
        # are resumed from, and the server or check_joined refuses the mismatch
        if self.periodic is None and wanted_run not in ("", run):
            log.info("not resuming from %s: it stopped in run %s", found[1], run or "-")
            return None
        self.resumed_in = run
        return found

    def check_joined(self, run: str) -> None:
        """After the first join of a client resumed from its state, with steps left to train:
        the server still trains it in that run. Else that run ended meanwhile (stopped with
        ``runs stop``, or gave its place up): training on from that state in another run would
        be wrong (and report steps that run never applied). A stop state is removed (the model
        was saved at the stop); checkpoints stay: after a kill they hold the only copy of the
        client's newest weights."""
        resumed_in, self.resumed_in = self.resumed_in, ""
        if not resumed_in or not run or run == resumed_in:
            return
        if self.periodic is not None:
            raise ConfigError(
                f"this client's checkpoint ({self.own_files()}) is of run {resumed_in}, which "
                f"the server no longer trains it in (it would join run {run}); to train a new "
                "run from the start, move those files away (the folder's other files are other "
                "workers') or set another [checkpoint] dir"
            )
        self.clear()
        raise ConfigError(
            f"this client stopped in run {resumed_in}, which the server no longer trains it "
            f"in (it would join run {run}); its stop state is removed: run the same "
            "command again to train from the start"
        )

    def own_files(self) -> str:
        """This client's checkpoint files, as a pattern a user can move (``init`` gives every
        client of a site one folder: moving it took the others' resume state too)."""
        assert self.periodic is not None
        return str(self.periodic.directory / f"{self.periodic.prefix}-*.ckpt")

    def after_run_ended(self, exc: PeerError) -> PeerError:
        """``run_ended`` says :data:`START_AGAIN`; with checkpoints of that run the same
        command is refused (see :meth:`check_joined`): say what to move first."""
        if self.periodic is None or START_AGAIN not in exc.reason:
            return exc
        return PeerError(
            exc.remote_code,
            f"{exc.reason}; first move this client's checkpoints of that run away "
            f"({self.own_files()}), or it resumes that run and is refused",
        )

    def explain(self, exc: PeerError, run: str) -> PeerError:
        """A ``stale_step`` refusal: the client was killed without a stop, and restarted
        behind the steps the server applied for it, by more than the server answers again
        from its cache (its last 16 steps of a client): it had no periodic checkpoints, or
        they came too far apart (``every_steps``). A ``run_ended``: see
        :meth:`after_run_ended`."""
        if exc.remote_code == "run_ended":
            return self.after_run_ended(exc)
        if exc.remote_code != "stale_step":
            return exc
        head = exc.reason.split(": ", 1)[0]
        stop = f"stop that run (`sl-pipeline runs stop {run or 'RUN'}`, its model is saved)"
        if self.periodic is not None and self.every == 1:  # no checkpoint of them at all
            return PeerError(
                exc.remote_code,
                f"{head}: this client's checkpoint folder ({self.periodic.directory}) holds "
                "no checkpoint of them (moved or emptied, or those steps were trained "
                f"without it); put that folder back to carry on, or {stop} and start again",
            )
        if self.periodic is None:
            why = (
                "this client started again without them, having no [checkpoint] dir to keep "
                "them through a kill without a stop (kill -9, the OOM killer, a power cut). "
                "Set one (sl-pipeline init and provision do)"
            )
        else:
            why = (
                "this client's newest checkpoint is older than the steps the server answers "
                f"again (its last {MAX_PIPELINE_DEPTH}): checkpoint.every_steps = {self.every} "
                "let a kill without a stop lose more. Set it to 1 (init's)"
            )
        return PeerError(
            exc.remote_code,
            f"{head}: {why} for the same command to carry on after such a kill; to train "
            f"now, {stop} and start it again",
        )

    def at_end(
        self, stopped: bool, steps_done: int, state: Callable[[], Mapping[str, Any]]
    ) -> Path | None:
        """Saved when the client ends: the last periodic checkpoint; or, stopped after a
        step, the stop state; finished, the stop state goes (a restart trains afresh).
        Stopped before its first step, nothing is saved: a restart starts afresh anyway."""
        if not steps_done or (self.periodic is None and not stopped):
            if not stopped and self.on_stop is not None:
                self.on_stop.clear()
            return None
        return self.save(state(), steps_done)

    def due(self, steps_done: int) -> bool:
        """Whether a periodic checkpoint is due after ``steps_done`` steps."""
        return self.periodic is not None and steps_done % self.every == 0

    def save(self, state: Mapping[str, Any], step: int) -> Path | None:
        store = self.periodic or self.on_stop
        return store.save(state, step) if store is not None else None

    def discard_after(self, step: int) -> None:
        store = self.periodic or self.on_stop
        if store is not None:
            store.discard_after(step)

    def clear(self) -> None:
        """Remove the saved state: a later start trains afresh."""
        self.discard_after(-1)

    def release(self) -> None:
        for store in (self.periodic, self.on_stop):
            if store is not None:
                store.release()
