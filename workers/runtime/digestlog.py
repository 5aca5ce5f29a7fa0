"""A relay's log of the requests it applied since its newest checkpoint: their digests.

A relay that checkpoints every N > 1 steps loses up to N-1 applied steps in a crash, and its
clients resend them (:mod:`workers.runtime.resends`). The next hop answers each from its
cache with the gradient of the request it was first sent, so the relay must run its segment
on that request again, not on other activations a client sends in its place. So before a
step's reply leaves, the relay appends the step's :func:`sl_pipeline.messages.request_digest`
to ``{name}.digests`` beside its checkpoints (fsynced where ``checkpoint.fsync`` is on, as
the checkpoints are), and empties the file at each checkpoint. After a restart the entries
past the checkpoint are the steps it lost: each client's must come back in their order, each
the same request again (:meth:`DigestLog.check`), else it is refused in one line, and
nothing runs; the honest clients' steps and the other clients' are not held up.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

from sl_pipeline.errors import CheckpointError, RedoError, StaleStepError
from sl_pipeline.messages import Message, request_digest

log = logging.getLogger("sl_pipeline.relay")
Step = tuple[int, int]


class DigestLog:
    """``{name}.digests`` in the checkpoint directory: one JSON line per applied step
    (``[count, client, epoch, step, digest]``, ``count`` the relay's applied steps then)."""

    def __init__(self, directory: Path, name: str, fsync: bool) -> None:
        self.path = directory / f"{name}.digests"
        self.fsync = fsync
        self.lost: dict[str, deque[tuple[Step, str]]] = {}  # per client, oldest first
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise CheckpointError(f"cannot open {self.path}: {exc}") from None

    def restore(self, applied: int, kept: list[Any]) -> int:
        """The steps past the checkpoint (``applied`` steps) are lost, and those its
        checkpoint says are still lost (``kept``: :meth:`state`): keep their digests. A torn
        last line (killed mid-write) is a step whose reply never left: cut off the file, so
        that the next line appended is whole."""
        self.lost.clear()
        data = self.path.read_bytes()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):  # the torn line goes, or the next append would join it
            os.ftruncate(self._fd, whole)
            if self.fsync:
                os.fdatasync(self._fd)
            log.warning("%s: dropped a torn last line (the relay stopped mid-write)", self.path)
        lines = data[:whole].decode("utf-8", errors="replace").splitlines()
        seen: set[tuple[str, Step]] = set()  # a set: a list scan made a restart quadratic
        for line in [json.dumps([applied + 1, *entry]) for entry in kept] + lines:
            try:
                count, client, epoch, step, digest = json.loads(line)
                entry, after = ((int(epoch), int(step)), str(digest)), int(count) > applied
            except (ValueError, TypeError):
                continue
            if after and (str(client), entry[0]) not in seen:
                seen.add((str(client), entry[0]))
                self.lost.setdefault(str(client), deque()).append(entry)
        self.lost = {client: steps for client, steps in self.lost.items() if steps}
        return sum(len(steps) for steps in self.lost.values())

    def state(self) -> list[list[Any]]:
        """The lost steps not run again yet, for the checkpoint: a second restart keeps
        them (the log starts over at each checkpoint)."""
        return [[c, e, s, d] for c, steps in self.lost.items() for (e, s), d in steps]

    def check(self, msg: Message) -> str | None:
        """Before a step runs: a step this relay lost must be its client's oldest lost one
        and the same request again; returns its digest (None: not a lost step's client)."""
        lost = self.lost.get(msg.client)
        if not lost:
            return None
        (step, digest), sent = lost[0], (msg.epoch, msg.step)
        if sent != step:
            raise StaleStepError(
                f"{msg.client} sent step {sent} before the step {step} this relay applied and "
                "lost in a restart: resend the recorded steps first, oldest first"
            )
        if request_digest(msg) != digest:
            raise RedoError(
                f"{msg.client}'s step {step} was applied before this relay's restart with "
                "other inputs: only the request first sent is run again (resend the "
                "recorded request, byte for byte)"
            )
        return digest

    def ran(self, msg: Message) -> None:
        """A lost step ran again: the next one of its client is due."""
        lost = self.lost.get(msg.client)
        if lost and lost[0][0] == (msg.epoch, msg.step):
            lost.popleft()
            if not lost:
                del self.lost[msg.client]

    def append(self, count: int, msg: Message, digest: str | None = None) -> None:
        """Before the step's reply leaves: its digest is on disk (fsynced with ``fsync``)."""
        digest = digest or request_digest(msg)
        line = json.dumps([count, msg.client, msg.epoch, msg.step, digest]) + "\n"
        try:
            os.write(self._fd, line.encode())
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.path}: {exc}") from None

    def checkpointed(self) -> None:
        """A checkpoint holds every step so far: the log starts over."""
        os.ftruncate(self._fd, 0)

    def forget(self, client: str | None = None) -> None:
        """A new run (or ``client`` starts its part of it over): the lost steps are not its."""
        if client is None:
            self.lost.clear()
        else:
            self.lost.pop(client, None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
