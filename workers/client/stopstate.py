"""Where a client's state goes: periodic checkpoints (``[checkpoint] dir``), or else the
state a graceful stop leaves, so that the same command carries on.

A client stopped by SIGTERM/SIGINT stops between steps: everything it applied is in its
memory, and the server holds the same steps for it. Without ``[checkpoint] dir`` that state
used to be dropped, and the restarted client, back at step 0 of a run that had applied its
steps, was refused as stale. Now a stop writes it to one file beside ``client.save``:
``NAME.stopped-STEP.ckpt``, in the checkpoint format (atomic, hashed, safe to load). The
next start resumes from it, in the run it stopped in; a finished run removes it. What a
stop state cannot cover is a client killed without a stop (``kill -9``, a power cut): that
needs ``[checkpoint] dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sl_pipeline.config import ClientConfig, resolve_path
from sl_pipeline.errors import ConfigError
from workers.runtime.checkpoint import CheckpointStore, open_store

log = logging.getLogger("sl_pipeline.client")


class StopState:
    """One client's stop-state file, opened (and locked) only when one is read or written:
    a client that never stops early leaves no file, and a start with none takes no lock."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.prefix = f"{name}.stopped"
        self._store: CheckpointStore | None = None

    def _open(self) -> CheckpointStore:
        if self._store is None:
            self._store = CheckpointStore(self.folder, keep=1, prefix=self.prefix)
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
    (saved at a stop only, removed at the end of its run)."""

    def __init__(self, cfg: ClientConfig, base: Path) -> None:
        name = cfg.client.name
        self.periodic = open_store(cfg.checkpoint, base, name)
        self.every = max(1, cfg.checkpoint.every_steps)
        # Only beside a saved model: a client that keeps nothing (an audit's, with
        # client.save = "") neither leaves a state nor resumes from the deployment's.
        # predict (no epochs) neither resumes from a stop state nor removes one.
        save = cfg.client.save
        stops = self.periodic is None and cfg.train.epochs > 0 and bool(save)
        folder = resolve_path(base, save, "client.save", must_exist=False).parent
        self.on_stop = StopState(folder, name) if stops else None
        self.stopped_in = ""  # the run of the stop state this client resumed from
        self.resumed_in = ""  # the run of the state it resumed from (checkpoint or stop state)
        self.where = str(self.periodic.directory) if self.periodic is not None else ""

    def restore(self, wanted_run: str) -> tuple[dict[str, Any], Path] | None:
        """The state to resume from: the newest checkpoint, or the stop state when this
        client trains the run it stopped in (``wanted_run`` empty: the server's choice)."""
        if self.periodic is not None:
            found = self.periodic.load_latest()
            self.resumed_in = str(found[0].get("run") or "") if found else ""
            return found
        found = self.on_stop.load_latest() if self.on_stop is not None else None
        if found is None:
            return None
        run = str(found[0].get("run", ""))
        if wanted_run not in ("", run):
            log.info("not resuming from %s: it stopped in run %s", found[1], run or "-")
            return None
        self.stopped_in = self.resumed_in = run
        return found

    def check_joined(self, run: str) -> None:
        """After the first join of a client resumed from its checkpoint or stop state, with
        steps left to train: the server still trains it in that run. Else that run ended
        meanwhile (stopped with ``runs stop``, or gave its place up): training on from that
        state in another run would be wrong (and report steps that run never applied)."""
        resumed_in, self.resumed_in = self.resumed_in, ""
        if self.periodic is not None and resumed_in and run and run != resumed_in:
            raise ConfigError(
                f"this client's checkpoint ({self.where}) is of run {resumed_in}, which the "
                f"server no longer trains it in (it would join run {run}); to train a new run "
                "from the start, move that folder away or set another [checkpoint] dir"
            )
        stopped_in, self.stopped_in = self.stopped_in, ""
        if not stopped_in or run == stopped_in:
            return
        self.clear_stop_state()
        raise ConfigError(
            f"this client stopped in run {stopped_in}, which the server no longer trains it "
            f"in (it would join run {run or '-'}); its stop state is removed: run the same "
            "command again to train from the start"
        )

    def at_end(
        self, stopped: bool, steps_done: int, state: Callable[[], Mapping[str, Any]]
    ) -> Path | None:
        """Saved when the client ends: the last periodic checkpoint; or, stopped after a
        step, the stop state; finished, the stop state goes (a restart trains afresh)."""
        if self.periodic is None and not (stopped and steps_done):
            if not stopped:
                self.clear_stop_state()
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

    def clear_stop_state(self) -> None:
        if self.on_stop is not None:
            self.on_stop.clear()

    def release(self) -> None:
        for store in (self.periodic, self.on_stop):
            if store is not None:
                store.release()
