"""Ended runs on a long-lived server: which are kept, and how the others' files go.

Each run that applied a step saves its model in a folder of its own under the runs folder
(``RUNS/RUN/server.pt``; ``RUNS/GROUP/RUN/server.pt`` where there are several groups). A
group keeps its newest ``server.keep_ended_runs`` ended runs (500, what the runs list holds
at most), and, where ``server.keep_ended_for_s`` is set, none that ended longer ago: an older
one leaves the runs list (``runs.json``, the checkpoint) first, then its folder is removed.
Active runs, and ended ones a connected client is still bound to, are never removed.

``server.save``, a copy of the newest run's model, goes with that run's files: what
retention removes leaves no copy behind (a file the server did not write for a run, one an
operator put there to start from, is never removed).

A folder goes by a rename out of its place (``.trash-*`` beside it), then is deleted: a crash
midway leaves either the whole folder or a trash folder, which the next start deletes; a
failure is a warning in the log, never the server's end. What was removed is remembered
(``RUNS/.removed.json``, each group's newest :data:`KEEP_REMOVED`), so the run API answers a removed
run's id with when and why, and a run that an older checkpoint still lists is not restored.
At start the policy applies again, and run folders the runs list no longer knows (forgotten
before this policy existed) are removed too.

An ended run's age (``keep_ended_for_s``) is the smaller of two: by the wall clock (now less
its recorded end), and as this process saw it pass on the monotonic clock (from its end, or,
for a run that ended before the process started, from the start plus its age by the wall
clock then): a wall clock set forward while the server runs (a VM resumed, NTP stepping a
clock that drifted, an operator's ``date -s``) removes no run early, and the jump is
logged. At start the wall clock is taken as it is."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from shutil import rmtree
from typing import Any

from sl_pipeline.config import ServerSection
from sl_pipeline.runid import is_run_id
from sl_pipeline.tenancy import SEPARATOR, qualify

log = logging.getLogger("sl_pipeline.server")

KEEP_ENDED = 500  # ended runs of a group the server lists (older ones: removed, or unlisted)
KEEP_REMOVED = 10_000  # removed runs of a group remembered, for the run API's answer
TOMBSTONES = ".removed.json"  # a dot name: no run or group is called so
TRASH = ".trash-"
TRASH_NAME = re.compile(r"\.trash-[0-9a-f]{12}")  # what delete() names: no operator's folder
RETIRE_EVERY_S = 60.0  # how often an idle server looks for runs past keep_ended_for_s
DAY_S = 86400.0
JUMP_S = 60.0  # the wall clock moving this far against the monotonic one is logged
MODEL_FILE = re.compile(r"server\.pt|\.server\.pt\.[0-9a-f]+\.tmp")  # what a run's folder holds


@dataclass(frozen=True)
class Orphan:
    """A run folder no listed run owns, as an ended run (ended when last written)."""

    key: str
    started: float

    @property
    def group(self) -> str:
        return self.key.partition(SEPARATOR)[0] if SEPARATOR in self.key else ""

    @property
    def ended(self) -> float:
        return self.started


class Clock:
    """The wall and monotonic clocks, read together from the process's start (this
    object's making), so that an ended run's age holds against a wall clock that jumps."""

    def __init__(self) -> None:
        self.wall0, self.mono0 = time.time(), time.monotonic()
        self.offset = self.wall0 - self.mono0  # as last logged

    def age_s(self, ended: float, ended_mono: float | None = None) -> float:
        """Seconds since a run ended at wall time ``ended`` (monotonic ``ended_mono``, where
        this process saw it end): the smaller of its age by either clock."""
        if ended_mono is None:  # ended before this process started, by the wall clock then
            ended_mono = self.mono0 - max(0.0, self.wall0 - ended)
        return min(time.time() - ended, time.monotonic() - ended_mono)

    def jumped_s(self) -> float | None:
        """How far the wall clock moved against the monotonic one since last asked (None:
        less than :data:`JUMP_S`, which drift and NTP's slewing never reach in a minute)."""
        offset = time.time() - time.monotonic()
        if abs(offset - self.offset) < JUMP_S:
            return None
        moved, self.offset = offset - self.offset, offset
        return moved


@dataclass(frozen=True)
class Retention:
    """``server.keep_ended_runs`` and ``server.keep_ended_for_s``."""

    keep_runs: int = KEEP_ENDED  # 0: folders kept (the list holds KEEP_ENDED)
    keep_for_s: float = 0.0  # 0: no age limit
    clock: Clock = field(default_factory=Clock, compare=False, repr=False)

    @classmethod
    def for_server(cls, server: ServerSection) -> Retention:
        return cls(server.keep_ended_runs, server.keep_ended_for_s)

    @property
    def listed(self) -> int:
        """Ended runs of a group the runs list holds."""
        return min(self.keep_runs or KEEP_ENDED, KEEP_ENDED)

    def why(self, reason: str) -> str:
        """Why a run's files were removed, naming the key that says so."""
        if reason == "age":
            days = self.keep_for_s / DAY_S
            return (
                f"ended runs are kept {days:.3g} days (server.keep_ended_for_s = "
                f"{self.keep_for_s:g})"
            )
        what = "the runs list had forgotten it; " if reason == "orphan" else ""
        return (
            f"{what}a group keeps its newest {self.listed} ended runs "
            f"(server.keep_ended_runs = {self.keep_runs})"
        )

    def expired(self, ended: list[Any]) -> list[tuple[Any, str]]:
        """Of one group's ended runs (``Run``), those to forget, each with its reason:
        beyond the newest :attr:`listed` (by end time), or ended ``keep_for_s`` ago (by
        both clocks: :meth:`Clock.age_s`)."""
        order = sorted(ended, key=lambda r: r.ended if r.ended is not None else r.started)
        old = {id(r) for r in order[: max(0, len(order) - self.listed)]}
        out = []
        for run in order:
            age = self.clock.age_s(run.ended or run.started, getattr(run, "ended_mono", None))
            aged = 0 < self.keep_for_s <= age
            if aged or id(run) in old:
                out.append((run, "age" if aged else "count"))
        return out


class RunFolders:
    """The runs folder's ended runs: removed safely, and remembered once removed."""

    def __init__(self, root: Path | None, retention: Retention) -> None:
        self.root = root
        self.retention = retention
        self.removed: dict[str, dict[str, Any]] = {}  # qualified id -> when, why
        self.numbers: dict[str, int] = {}  # each group's highest run-N removed: never reused
        self.saved: dict[str, str] = {}  # server.save: {"id": run, "path": file} it copies
        self.count = 0  # folders removed since start (sl_bound_hits_total{table="ended_runs"})
        self.checked_at = time.monotonic()
        self.on_removed: Callable[[], None] = lambda: None  # counted in a metric
        if root is not None and (root / TOMBSTONES).exists():
            self._load(root / TOMBSTONES)

    def _load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            self.removed = {str(e["id"]): dict(e) for e in state["removed"]}
            self.numbers = {str(g): int(n) for g, n in state["numbers"].items()}
            self.saved = {str(k): str(v) for k, v in state.get("saved", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            bad = path.with_name(f"{TOMBSTONES}.bad")  # not overwritten by the next removal
            with contextlib.suppress(OSError):
                os.replace(path, bad)
            log.warning(
                "%s cannot be read (%s; kept as %s); removed runs are answered as unknown",
                path,
                exc,
                bad.name,
            )

    def folder(self, key: str) -> Path | None:
        """Where run ``key``'s files lie (as ``RunBook.model_path`` places them)."""
        if self.root is None:
            return None
        return self.root.joinpath(*key.split(SEPARATOR, 1))

    def forgotten(self, runs: list[tuple[Any, str]]) -> None:
        """``runs`` (``Run``, reason) left the runs list, which is written: their folders go
        (not those the count alone let go, where ``keep_ended_runs = 0`` keeps them)."""
        now = time.time()
        for run, reason in runs:
            if m := re.fullmatch(r"run-(\d+)", run.id):
                self.numbers[run.group] = max(self.numbers.get(run.group, 0), int(m.group(1)))
            if reason == "count" and not self.retention.keep_runs:
                continue
            self._remove(run.key, run.group, reason, run.started, now)
        if runs:
            self._write()

    def saved_as(self, key: str, path: Path) -> None:
        """``server.save`` (``path``) now holds run ``key``'s model: it goes with the run."""
        if self.saved != {"id": key, "path": str(path)}:
            self.saved = {"id": key, "path": str(path)}
            self._write()

    def _remove(self, key: str, group: str, reason: str, started: float, now: float) -> None:
        folder = self.folder(key)
        if folder is not None and folder.exists() and not self.delete(folder):
            return  # left as it is: the next start tries again
        if self.saved.get("id") == key:  # server.save, the copy of its model, goes too
            self._remove_saved(key)
        self.removed.pop(key, None)
        why = self.retention.why(reason)  # the keys as they were then
        self.removed[key] = dict(id=key, group=group, why=why, started=started, removed=now)
        self.count += 1
        self.on_removed()
        log.info("removed run %s and its files: %s", key, why)

    def _remove_saved(self, key: str) -> None:
        path, self.saved = self.saved["path"], {}
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not remove %s (server.save, run %s's model): %s", path, key, exc)
            return
        log.info("removed %s (server.save), run %s's model, with the run", path, key)

    def delete(self, folder: Path) -> bool:
        """Moved out of its place at once (a rename), then deleted: never half a folder
        where a run's lies; False (logged) where it could not be moved."""
        assert self.root is not None
        # beside it: a group's folder may be another disk (mounted, or a link to one)
        trash = folder.parent / f"{TRASH}{secrets.token_hex(6)}"
        try:
            if _holds_a_run(folder):
                os.replace(folder, trash)
            else:  # it holds more (another group's folder of that name): its model alone
                trash.mkdir()
                for name in [p.name for p in folder.iterdir() if MODEL_FILE.fullmatch(p.name)]:
                    os.replace(folder / name, trash / name)
        except OSError as exc:
            log.warning("could not remove %s (%s); the next start tries again", folder, exc)
            return False
        self._empty(trash)
        return True

    @staticmethod
    def _empty(trash: Path) -> None:
        try:
            rmtree(trash)
        except OSError as exc:
            log.warning("could not delete %s (%s); the next start tries again", trash, exc)

    def _write(self) -> None:
        count = Counter(e.get("group") for e in self.removed.values())
        for key, entry in list(self.removed.items()):  # each group's newest KEEP_REMOVED
            if count[entry.get("group")] > KEEP_REMOVED:  # (one's churn forgets no other's)
                count[entry.get("group")] -= 1
                del self.removed[key]
        if self.root is None:
            return
        state: dict[str, Any] = {"removed": list(self.removed.values()), "numbers": self.numbers}
        state["saved"] = self.saved
        tmp = self.root / f"{TOMBSTONES}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state, indent=0))
            os.replace(tmp, self.root / TOMBSTONES)
        except OSError as exc:
            log.warning("could not record the removed runs in %s: %s", self.root, exc)

    def was_removed(self, key: str, started: float) -> bool:
        """Run ``key`` (a record an older checkpoint or list still holds) was removed."""
        entry = self.removed.get(key)
        return entry is not None and abs(float(entry.get("started") or 0) - started) < 1e-3

    def sweep(self, listed: list[Any]) -> None:
        """At start: trash a crash left, and run folders no ``listed`` run (``Run``) owns
        (the runs list forgot them: before this policy, beyond its 500) that the policy lets
        go, counted with their group's listed ended runs by the folder's time: a runs list
        lost or moved away, or an older checkpoint, takes no run the policy keeps."""
        if self.root is None or not self.root.is_dir():
            return
        for trash in [*self.root.glob(f"{TRASH}*"), *self.root.glob(f"*/{TRASH}*")]:
            if TRASH_NAME.fullmatch(trash.name) and trash.is_dir():
                self._empty(trash)
        if not self.retention.keep_runs or not (self.root / "runs.json").exists():
            return  # folders kept forever; or no list yet, nothing it could have forgotten
        keys = {r.key for r in listed}
        orphans = [
            Orphan(key, (folder / "server.pt").stat().st_mtime)  # when its model was saved
            for key, folder in run_folders(self.root)
            if key not in keys
        ]
        now = time.time()
        for group in {o.group for o in orphans}:
            mine = [r for r in listed if r.group == group and r.ended is not None]
            mine += [o for o in orphans if o.group == group]
            for orphan, _ in self.retention.expired(mine):
                if isinstance(orphan, Orphan):
                    self._remove(orphan.key, group, "orphan", orphan.started, now)
        self._write()

    def on_disk(self) -> None:
        """Each group's highest ``run-N`` with a folder counts as taken: a runs list moved
        away numbers no new run into an earlier run's folder (its model overwritten)."""
        if self.root is None or not self.root.is_dir():
            return
        for key, _ in run_folders(self.root):
            group, _, run_id = key.rpartition(SEPARATOR)
            if m := re.fullmatch(r"run-(\d+)", run_id):
                self.numbers[group] = max(self.numbers.get(group, 0), int(m.group(1)))

    def gone(self, key: str, group: str | None) -> str | None:
        """Why run ``key`` is no more, for one who may see it (``group``: a group's token,
        which sees its own runs only); None: never known to be removed."""
        entry = self.removed.get(key)
        if entry is None or group not in (None, entry.get("group")):
            return None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(entry["removed"])))
        return (
            f"run {key!r} ended and its files were removed on {when}: "
            f"{entry.get('why')}; download a run's model "
            "(`sl-pipeline runs download`) before it goes"
        )


def run_folders(root: Path) -> list[tuple[str, Path]]:
    """Every folder under ``root`` that holds a run's files and nothing else, by its
    qualified id (``RUN`` or ``GROUP/RUN``): nothing an operator put there is taken."""
    found = []
    for entry in sorted(root.iterdir()):
        if not is_run_id(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        if _holds_a_run(entry):
            found.append((entry.name, entry))
            continue
        try:
            subs = sorted(entry.iterdir())
        except OSError as exc:  # an operator's folder this server may not read: not a run's
            log.warning("cannot read %s (%s); it is left as it is", entry, exc)
            continue
        for sub in subs:
            if is_run_id(sub.name) and not sub.is_symlink() and _holds_a_run(sub):
                found.append((qualify(entry.name, sub.name), sub))
    return found


def _holds_a_run(folder: Path) -> bool:
    try:
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    except OSError:  # unreadable: no folder of a run this server wrote
        return False
    files = all(MODEL_FILE.fullmatch(n) and (folder / n).is_file() for n in names)
    return bool(names) and files and "server.pt" in names


__all__ = ["KEEP_ENDED", "Retention", "RunFolders", "run_folders"]
