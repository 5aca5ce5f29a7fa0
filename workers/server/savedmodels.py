"""The server's model files: ``server.save`` (the newest run's segment, loaded at start)
and each file checked before it is used or written; its output folders removed again when
it never served."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sl_pipeline.config import ServerConfig, resolve_path
from sl_pipeline.errors import ConfigError
from workers.runtime.checkpoint import CheckpointStore
from workers.runtime.savedmodel import check_writable, load_weights, remove_empty, save_weights
from workers.server.engines.base import Engine
from workers.server.retention import RunFolders
from workers.server.runs import RunBook

log = logging.getLogger("sl_pipeline.server")


class SavedModels:
    """Mixed into the server worker (through :class:`~workers.server.runhost.RunHost`)."""

    cfg: ServerConfig
    base: Path
    book: RunBook
    folders: RunFolders
    ckpt: CheckpointStore | None
    made_folders: list[Path]

    def _save_path(self) -> Path | None:
        if not self.cfg.server.save:
            return None
        return resolve_path(self.base, self.cfg.server.save, "server.save", must_exist=False)

    def _load_model(self, engine: Engine, path: Path, what: str) -> None:
        try:
            engine.model.load_state_dict(load_weights(path, what))
        except (RuntimeError, KeyError, OSError, EOFError) as exc:
            raise ConfigError(
                f"{what} ({path}) does not fit this server's model: {first_line(exc)}; "
                "use the [model] section it was trained with, or move the file away"
            ) from None

    def _load_checkpointed(self, engine: Engine, state: dict[str, Any], path: Path) -> None:
        """A run's engine as checkpoint ``path`` holds it, or one line: it does not fit."""
        try:
            engine.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"checkpoint {path} does not fit this server's model ({first_line(exc)}); "
                "point checkpoint.dir elsewhere or remove it"
            ) from None

    def _load_saved(self, engine: Engine) -> bool:
        path = self._save_path()
        if path is None or not path.exists():
            return False
        self._load_model(engine, path, f"server.save = {self.cfg.server.save!r}")
        log.info("loaded the server segment from %s", path)
        return True

    def _save_latest(self, engine: Engine, key: str) -> None:
        """``server.save`` always holds the newest run's segment (removed with its files)."""
        if (path := self._save_path()) is not None:
            save_weights(engine.model.state_dict(), path, "the newest run's model (server.save)")
            self.folders.saved_as(key, path)

    async def on_never_served(self, bound: bool) -> None:
        """Its port taken: no runs list or checkpoint written, and the folders made at start
        removed (a refused start left an empty checkpoint folder with its lock behind)."""
        self.undo_start()

    @contextlib.contextmanager
    def undone_if_refused(self) -> Iterator[None]:
        """What the start made so far undone (:meth:`undo_start`) if what it runs raises."""
        try:
            yield
        except BaseException:
            self.undo_start()
            raise

    def undo_start(self) -> None:
        """The folders this start made removed again while empty (the checkpoint's, then the
        outputs'): it is refused (its port, a token file, a lock another worker holds)."""
        ckpt = getattr(self, "ckpt", None)  # none yet where opening it was refused
        if ckpt is not None:
            ckpt.discard_if_unused()
        remove_empty(self.made_folders)

    def check_outputs_writable(self) -> list[Path]:
        """A read-only or missing output folder is found at start, not when a run ends. The
        folders made to check, in the order they were made."""
        made = []
        path = self._save_path()
        if path is not None:
            made += check_writable(path, "server.save")
        if self.book.dir is not None:
            made += check_writable(self.book.dir / "runs.json", "server.runs_dir")
        return made


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
