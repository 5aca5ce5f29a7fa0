"""Folders written whole or not at all (``init``'s deployment, ``provision``'s kits).

Everything is written in a temporary folder first; only when it is whole is it put in place.
A full disk or a Ctrl-C before leaves the destination as it was: no half key or config that
a rerun would refuse as existing, or a worker would trust.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sl_pipeline.errors import ConfigError, SLError


@contextlib.contextmanager
def staged(
    out: Path, what: str, command: str, place: Callable[[Path, Path], None], *, beside: bool
) -> Iterator[Path]:
    """A temporary folder inside ``out`` (or ``beside`` it, in its parent) to write ``what``
    in; when the block ends, ``place(stage, out)`` puts it in place. An OSError while writing
    is one line naming ``out``; the temporary folder is removed whatever happens."""
    stage = Path(tempfile.mkdtemp(prefix=f".{command}-", dir=out.parent if beside else out))
    try:
        try:
            yield stage
        except OSError as exc:
            raise ConfigError(
                f"cannot write {what} in {out}: {exc.strerror or exc}; free some space (or "
                f"choose another folder) and run {command} again: nothing was kept"
            ) from None
        place(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def renamed(stage: Path, out: Path) -> None:
    """The whole folder renamed to ``out`` in one step (an empty ``out`` is replaced)."""
    try:
        stage.rename(out)
    except OSError as exc:  # a folder that appeared meanwhile, not empty: the user's to keep
        raise ConfigError(f"{out} is not empty; give a new folder (nothing was written)") from exc


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file-size limit, a quota


@contextlib.contextmanager
def scratch(command: str) -> Iterator[Path]:
    """A temporary folder to train a throwaway deployment in (audit, tune, the canary runs),
    removed after. A disk that fills there (a checkpoint, a saved model) is one line naming
    the reason and TMPDIR, not what the worker that hit it could say."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"sl-{command}-") as tmp:
            yield Path(tmp)
    except (SLError, OSError) as exc:
        full = (e for e in _chain(exc) if isinstance(e, OSError) and e.errno in FULL)
        reason = next((e.strerror for e in full), None)
        if reason is None:
            raise
        raise ConfigError(
            f"cannot write in the {command}'s temporary folder ({reason}): free some space in "
            f"{tempfile.gettempdir()}, or set TMPDIR to a folder with room; then run it again"
        ) from exc


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


__all__ = ["renamed", "scratch", "staged"]
