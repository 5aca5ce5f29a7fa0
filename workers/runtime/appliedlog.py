"""Which training steps a worker applied, kept as runs of consecutive steps.

The log is what proves "every step applied exactly once" across crashes and restarts (a
server's or relay's checkpoint carries it). Kept entry by entry it grew by a Python list per
step in memory, and ~15 bytes per step in every checkpoint, for ever. Steps arrive in order
per client and epoch, so the log keeps ``[client, epoch, first, last]`` ranges instead: a
normal run holds one range per client and epoch, whatever its length. A step applied twice
cannot extend a range (it is not the next step), so it opens a range of its own and still
shows up twice when the log is read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class AppliedLog:
    def __init__(self) -> None:
        self._ranges: list[list[Any]] = []  # [client, epoch, first step, last step]
        self._open: dict[str, int] = {}  # client -> index of its newest range
        self._count = 0
        self.last: list[Any] | None = None  # the step applied most recently

    def append(self, client: str, epoch: int, step: int) -> None:
        index = self._open.get(client)
        newest = None if index is None else self._ranges[index]
        if newest is not None and newest[1] == epoch and newest[3] + 1 == step:
            newest[3] = step
        else:
            self._open[client] = len(self._ranges)
            self._ranges.append([client, epoch, step, step])
        self._count += 1
        self.last = [client, epoch, step]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[list[Any]]:
        """Every applied step as ``[client, epoch, step]``, range by range."""
        for client, epoch, first, last in self._ranges:
            for step in range(first, last + 1):
                yield [client, epoch, step]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AppliedLog) and self._ranges == other._ranges

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def ranges(self) -> int:
        return len(self._ranges)

    def state(self) -> dict[str, Any]:
        """Checkpoint form: client names, and one int tensor of ranges (no pickled lists)."""
        names = sorted({str(r[0]) for r in self._ranges})
        index = {n: i for i, n in enumerate(names)}
        rows = [[index[str(c)], int(e), int(a), int(z)] for c, e, a, z in self._ranges]
        return {"clients": names, "ranges": torch.tensor(rows, dtype=torch.long).reshape(-1, 4)}

    @classmethod
    def from_state(cls, state: Any) -> AppliedLog:
        """Read a checkpoint's log, in this form or the per-step forms written before it
        (a list of ``[client, epoch, step]``, or names plus a tensor of such rows)."""
        log = cls()
        if isinstance(state, list):
            steps = [(str(c), int(e), int(s)) for c, e, s in state]
        elif "rows" in state:
            names = list(state["clients"])
            steps = [(names[c], e, s) for c, e, s in state["rows"].tolist()]
        else:
            names = list(state["clients"])
            for c, epoch, first, last in state["ranges"].tolist():
                log._open[names[c]] = len(log._ranges)
                log._ranges.append([names[c], epoch, first, last])
                log._count += last - first + 1
                log.last = [names[c], epoch, last]
            return log
        for client, epoch, step in steps:
            log.append(client, epoch, step)
        return log


def decode_log(state: Any) -> list[list[Any]]:
    """A checkpoint's applied-step log as ``[client, epoch, step]`` entries."""
    return list(AppliedLog.from_state(state))


__all__ = ["AppliedLog", "decode_log"]
