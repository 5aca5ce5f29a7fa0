"""The server's memory of its last replies, per client and request kind.

It makes every step idempotent: a request for a step already applied gets the same reply
again and is never applied twice. It keeps the last few steps (not only the last one) so a
pipelining client, with several steps in flight, can resend all of them after a rejoin.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sl_pipeline.messages import Message

from .checkpoint import message_from_state, message_state

Step = tuple[int, int]


class ReplyCache:
    def __init__(self, depth: int = 8) -> None:
        self.depth = depth
        self._items: dict[tuple[str, str], OrderedDict[Step, Message]] = {}

    def get(self, client: str, kind: str, step: Step) -> Message | None:
        return self._items.get((client, kind), OrderedDict()).get(step)

    def newest(self, client: str, kind: str) -> Step | None:
        steps = self._items.get((client, kind))
        return next(reversed(steps)) if steps else None

    def oldest(self, client: str, kind: str) -> Step | None:
        steps = self._items.get((client, kind))
        return next(iter(steps)) if steps else None

    def put(self, client: str, kind: str, step: Step, reply: Message) -> None:
        steps = self._items.setdefault((client, kind), OrderedDict())
        steps[step] = reply
        while len(steps) > self.depth:
            steps.popitem(last=False)

    def entries(self) -> list[dict[str, Any]]:
        """A checkpoint-safe list (the safe loader refuses tuple keys)."""
        return [
            {"client": c, "kind": k, "step": list(step), "reply": message_state(m)}
            for (c, k), steps in self._items.items()
            for step, m in steps.items()
        ]

    def load(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            step = (int(entry["step"][0]), int(entry["step"][1]))
            self.put(entry["client"], entry["kind"], step, message_from_state(entry["reply"]))
