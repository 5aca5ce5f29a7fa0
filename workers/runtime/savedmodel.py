"""A trained segment saved as a file (``client.save``, ``server.save``, ``relay.save``), and
read back with the safe loader. Unlike a checkpoint it is a plain ``torch.save`` of state
dicts, for the user's own tools; it is still written atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.errors import CheckpointError, ConfigError


def load_weights(path: Path, what: str) -> dict[str, Any]:
    """A saved segment file (``torch.save`` of state dicts), read with the safe loader. A file
    that is not one (truncated, another format, a copy gone wrong) is one line naming it."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # the loader's many failure types all mean "not a model file"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(
            f"{what}: {path} is not a readable saved model ({reason}); restore the file, "
            "train again, or move it away"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: {path} holds a {type(state).__name__}, not a saved model")
    return state


def save_weights(state: Mapping[str, Any], path: Path, what: str) -> None:
    """Write a segment file; a full disk or a read-only folder is a CheckpointError naming
    it (training already done is still in the checkpoints, where they are on). Written to a
    temp file beside it and renamed over it: a full disk or a Ctrl-C mid-write leaves the
    previous model whole (``server.save`` is loaded at the next start), never half a file."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("xb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"cannot save {what} to {path}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)


def make_folders(folder: Path, mode: int = 0o777) -> list[Path]:
    """Create ``folder`` (with ``mode``) and its missing parents, one level at a time; the
    folders this call created, in the order it made them. A level that exists when it comes
    to it is not counted, whatever made it: another process, or a path through ``..``
    (``x/../shared`` names the ``shared`` that was there; counted as made, it was removed)."""
    missing = []
    for each in (folder, *folder.parents):
        if each.exists():
            break
        missing.append(each)
    made = []
    for each in reversed(missing):
        try:
            each.mkdir(mode=mode if each == folder else 0o777)
        except FileExistsError:
            continue
        made.append(each)
    return made


def remove_empty(made: list[Path]) -> None:
    """Remove those of ``made`` (folders in the order they were made) that are empty, the
    newest first: a folder that only held later ones goes too, and a path through ``..`` is
    removed while the folder it passes through is still there."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):  # not empty (written meanwhile), or gone: it stays
            folder.rmdir()


def check_writable(path: Path, what: str) -> list[Path]:
    """Before any training: the folder of ``path`` can be made and written, so that a read-
    only or missing folder is found at start, not when a finished run's model is saved. The
    folders it made, in that order (a worker that then cannot start removes them)."""
    folder = path.parent
    try:
        made = make_folders(folder)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{what} = {str(path)!r}: cannot write in {folder} ({exc.strerror or exc}); "
            "choose a folder this user may write to"
        ) from None
    return made


__all__ = ["check_writable", "load_weights", "make_folders", "remove_empty", "save_weights"]
