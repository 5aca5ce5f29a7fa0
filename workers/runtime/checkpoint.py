"""Atomic, integrity-checked worker checkpoints that never unpickle arbitrary objects.

A checkpoint file is ``MAGIC | payload length (8, BE) | SHA-256(payload) (32) | payload``,
where ``payload`` is ``torch.save({"format", "step", "state"})``. Reading verifies the
length and hash first, then calls ``torch.load(..., weights_only=True)``: only tensors,
containers and primitives come back, never a class instance. Writing goes to a temp file
in the same directory, is fsynced, ``os.replace``d into place and the directory fsynced, so
a crash leaves either the old set of files or the new one, never a half file under a
checkpoint name. :class:`SnapshotRing` keeps in-memory undo points between checkpoints.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import fcntl
import hashlib
import io
import logging
import os
import random
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.config import CheckpointConfig, resolve_path
from sl_pipeline.errors import CheckpointError, ConfigError
from workers.runtime.savedmodel import make_folders, remove_empty

log = logging.getLogger("sl_pipeline.checkpoint")

MAGIC = b"SLCKPT\x00\x01"
_HEADER = struct.Struct(">8sQ32s")  # magic, payload length, sha256
FORMAT = 1
LOCK_TRIES = 3  # a lock file removed under a starting worker (a refused start's): open it again
_SAFE_SCALARS = (str, bytes, int, float, bool, type(None), torch.dtype, torch.Size)
_PLAIN = frozenset((str, int, float, bool, type(None)))  # exact types: a list of them is safe


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def _unframe(blob: bytes, name: str) -> bytes:
    if len(blob) < _HEADER.size:
        raise CheckpointError(f"{name}: {len(blob)} bytes is shorter than the header (torn write?)")
    magic, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError(f"{name}: not an sl-pipeline checkpoint (bad magic)")
    payload = blob[_HEADER.size :]
    if len(payload) != length:
        raise CheckpointError(f"{name}: payload is {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{name}: SHA-256 mismatch (corrupt file)")
    return payload


def _check_safe(obj: Any, where: str, depth: int = 0) -> None:
    """Refuse, at save time, anything ``weights_only`` loading would refuse later."""
    if depth > 64:
        raise CheckpointError(f"checkpoint state nests deeper than 64 levels at {where}")
    if isinstance(obj, (torch.Tensor, *_SAFE_SCALARS)):
        return
    if isinstance(obj, dict):  # OrderedDict included
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise CheckpointError(f"checkpoint key {key!r} at {where} must be str or int")
            _check_safe(value, f"{where}.{key}", depth + 1)
        return
    if isinstance(obj, list | tuple):
        if all(type(value) in _PLAIN for value in obj):  # losses, ids: no path to format
            return
        for i, value in enumerate(obj):
            _check_safe(value, f"{where}[{i}]", depth + 1)
        return
    raise CheckpointError(
        f"checkpoint value at {where} is a {type(obj).__name__}; store tensors, dicts, lists, "
        "tuples and primitives only (e.g. call .state_dict() or convert to a list)"
    )


def encode(state: Mapping[str, Any], step: int) -> bytes:
    """The bytes of a checkpoint file for ``state`` at ``step``."""
    _check_safe(dict(state), "state")
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, "state": dict(state)}, buf)
    return _frame(buf.getvalue())


def decode(blob: bytes, name: str = "checkpoint") -> tuple[dict[str, Any], int]:
    """``(state, step)`` from checkpoint bytes; CheckpointError if torn, corrupt or unsafe."""
    payload = _unframe(blob, name)
    try:
        obj = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:  # any loader failure means "unusable file"
        raise CheckpointError(f"{name}: refused by the safe loader: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{name}: unknown checkpoint format")
    state, step = obj.get("state"), obj.get("step")
    if not isinstance(state, dict) or not isinstance(step, int):
        raise CheckpointError(f"{name}: malformed checkpoint wrapper")
    return state, step


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The last ``keep`` checkpoints of one worker in ``directory``, named by step.

    ``step`` is a global, monotonically increasing counter (e.g. steps applied); one
    store per worker and directory. Files: ``{prefix}-{step:012d}.ckpt``, mode 0600 (they
    hold model weights); a directory it creates is 0700.
    """

    def __init__(
        self,
        directory: Path,
        keep: int = 3,
        prefix: str = "ckpt",
        fsync: bool = True,
        key: str = "checkpoint.dir",
        owner: str = "",
    ) -> None:
        self.fsync = fsync
        self.key = key  # the setting that names the directory, for a refusal
        self.owner = owner or prefix  # the worker's name, for a refusal
        if keep < 1:
            raise CheckpointError(f"keep = {keep}: keep at least one checkpoint")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", prefix):
            raise CheckpointError(f"prefix {prefix!r}: use 1-64 letters, digits, '_', '.', '-'")
        self.directory = Path(directory)
        self.keep = keep
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d{{12}})\.ckpt")
        try:
            self._made = make_folders(self.directory, mode=0o700)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint dir {directory}: {exc}") from None
        self._lock_fd = self._lock()
        self._remove_stale_temps()

    def _lock(self) -> int:
        """Hold ``.PREFIX.lock`` for this process's life: a second worker of the same name
        on these checkpoints (a second server started on the same state, the same client
        started twice) would write over this one's. A POSIX lock ends with its process,
        ``kill -9`` included, and never conflicts with its own process (in-process tests)."""
        path = self.directory / f".{self.prefix}.lock"
        for _ in range(LOCK_TRIES):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise CheckpointError(f"cannot open {path}: {exc}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ConfigError(
                    f"{self.key} {self.directory} is in use by another running worker named "
                    f"{self.owner!r} (pid {holder}); two would overwrite each other's state: "
                    f"stop that one first, or give this one its own {self.key}"
                ) from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)  # a lock on a file removed meanwhile (a refused start's): locks none
        raise CheckpointError(f"cannot lock {path}: it was removed {LOCK_TRIES} times over")

    def release(self) -> None:
        """Give the lock up: the worker stopped (a long-lived process that ran it in-process,
        as the audit and the tests do, must not keep others off its directory). A later save
        takes the lock again."""
        fd = getattr(self, "_lock_fd", -1)
        if fd >= 0:
            os.close(fd)
            self._lock_fd = -1

    __del__ = release  # the lock goes with the store too

    def discard_if_unused(self) -> None:
        """Remove the folders this store created, if they hold nothing but its lock: the worker
        never started (its port was taken), and a folder it made then would be left behind."""
        lock = self.directory / f".{self.prefix}.lock"
        held = self._lock_fd >= 0
        unused = bool(self._made) and held and all(p == lock for p in self.directory.iterdir())
        if unused:
            with contextlib.suppress(OSError):
                lock.unlink()  # still holding it: a worker that opened it meanwhile is refused
        self.release()
        if unused:
            remove_empty(self._made)

    def path_for(self, step: int) -> Path:
        if not 0 <= step < 10**12:
            raise CheckpointError(f"checkpoint step {step} is out of range [0, 10**12)")
        return self.directory / f"{self.prefix}-{step:012d}.ckpt"

    def list(self) -> list[Path]:
        """Checkpoint files, oldest step first (validity is not checked)."""
        return [path for _, path in self._indexed()]

    def _indexed(self) -> builtins.list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = self._pattern.fullmatch(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        """Write atomically, then prune to the newest ``keep``; returns the file."""
        if self._lock_fd < 0:  # released at a stop, and the worker runs again
            self._lock_fd = self._lock()
        final = self.path_for(step)
        blob = encode(state, step)
        tmp = self.directory / f".{self.prefix}-{step:012d}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {exc}") from None
        self._prune()
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """One file's state; CheckpointError if it is unreadable, torn or corrupt."""
        try:
            blob = Path(path).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
        state, step = decode(blob, str(path))
        match = self._pattern.fullmatch(Path(path).name)
        if match and int(match.group(1)) != step:
            raise CheckpointError(f"{path}: holds step {step}, not the step in its name")
        return state

    def load_latest(self, max_step: int | None = None) -> tuple[dict[str, Any], Path] | None:
        """The newest valid checkpoint (at or below ``max_step``); torn files are skipped."""
        for step, path in reversed(self._indexed()):
            if max_step is not None and step > max_step:
                continue
            try:
                return self.load(path), path
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc.message)
        return None

    def discard_after(self, step: int) -> builtins.list[Path]:
        """Delete checkpoints newer than ``step`` (after a rollback they are another
        timeline and must not be resumed from); returns what was deleted."""
        removed = [path for s, path in self._indexed() if s > step]
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            _fsync_dir(self.directory)
        return removed

    def _prune(self) -> None:
        indexed = self._indexed()
        for _, path in indexed[: max(0, len(indexed) - self.keep)]:
            path.unlink(missing_ok=True)

    def _remove_stale_temps(self) -> None:
        """Temp files left by a crash mid-save are never valid: remove them."""
        for path in self.directory.glob(f".{self.prefix}-*.tmp"):
            log.info("removing stale checkpoint temp file %s", path)
            path.unlink(missing_ok=True)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file at ``path`` now (not one unlinked since it was opened)."""
    try:
        there = os.stat(path)
    except OSError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def open_store(cfg: CheckpointConfig, base: Path, prefix: str) -> CheckpointStore | None:
    """The store ``[checkpoint]`` asks for (``dir`` relative to the config), or None."""
    if not cfg.dir:
        return None
    directory = resolve_path(base, cfg.dir, "checkpoint.dir", must_exist=False)
    return CheckpointStore(directory, keep=max(1, cfg.keep), prefix=prefix, fsync=cfg.fsync)


def check_fingerprint(state: Mapping[str, Any], path: Path, fingerprint: str) -> None:
    """Refuse a checkpoint written for another model or topology than this worker's."""
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {path} is for another model or topology; "
            "point checkpoint.dir elsewhere or remove it"
        )


class SnapshotRing:
    """In-memory deep copies of state keyed by (epoch, step), oldest dropped beyond
    ``capacity``: the undo points a client rolls back to after a server restart."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise CheckpointError(f"capacity = {capacity}: keep at least one snapshot")
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, key: tuple[int, int], state: Mapping[str, Any]) -> None:
        self._items[key] = copy.deepcopy(dict(state))
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            dropped, _ = self._items.popitem(last=False)
            # by design (sized to reach past what the server may lose): not worth a warning
            # at every step of every run with checkpoint.every_steps > 1
            log.debug("undo snapshot %s dropped: ring full (capacity %d)", dropped, self.capacity)

    def get(self, key: tuple[int, int]) -> dict[str, Any] | None:
        """A deep copy of the snapshot at ``key`` (safe to load into live objects)."""
        item = self._items.get(key)
        return None if item is None else copy.deepcopy(item)

    def discard_after(self, key: tuple[int, int]) -> None:
        for k in [k for k in self._items if k > key]:
            del self._items[k]

    def keys(self) -> list[tuple[int, int]]:
        return list(self._items)


def rng_state() -> dict[str, Any]:
    """torch (CPU) and Python ``random`` state in a ``weights_only``-safe form."""
    version, internal, gauss = random.getstate()
    # One tensor, not 625 ints: each int costs the checkpoint's pickler a call, and a
    # checkpoint is written after every step (restore_rng reads the older list form too)
    words = torch.tensor(internal, dtype=torch.int64)
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": words, "gauss": gauss},
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo :func:`rng_state`; CheckpointError if the state is malformed."""
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        words = py["internal"]
        words = words.tolist() if isinstance(words, torch.Tensor) else words
        random.setstate((int(py["version"]), tuple(int(x) for x in words), py["gauss"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot restore RNG state from checkpoint: {exc}") from None


__all__ = [
    "CheckpointStore",
    "SnapshotRing",
    "decode",
    "encode",
    "open_store",
    "restore_rng",
    "rng_state",
]
