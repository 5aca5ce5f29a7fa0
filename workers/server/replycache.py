"""The server's memory of its last replies, per client and request kind.

It makes every step idempotent: a request for a step already applied gets the same reply
again and is never applied twice. It keeps the last few steps (not only the last one) so a
pipelining client, with several steps in flight, can resend all of them after a rejoin.
Both dimensions are bounded: ``depth`` steps per name and kind, ``max_names`` names (the
least recently active name goes first, and ``on_hit`` reports it), so no peer can grow it
without limit, in memory or in every checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sl_pipeline.messages import Message
from workers.runtime.bounded import LruTable, no_hit
from workers.runtime.checkpoint import message_from_state, message_state

Step = tuple[int, int]


class ReplyCache:
    def __init__(
        self, depth: int = 8, max_names: int = 256, on_hit: Callable[[], None] = no_hit
    ) -> None:
        self.depth = depth
        self._names: LruTable[str, dict[str, OrderedDict[Step, Message]]] = LruTable(
            max_names, on_hit
        )

    def _steps(self, client: str, kind: str) -> OrderedDict[Step, Message] | None:
        kinds = self._names.get(client)
        return None if kinds is None else kinds.get(kind)

    def get(self, client: str, kind: str, step: Step) -> Message | None:
        steps = self._steps(client, kind)
        return None if steps is None else steps.get(step)

    def newest(self, client: str, kind: str) -> Step | None:
        steps = self._steps(client, kind)
        return next(reversed(steps)) if steps else None

    def oldest(self, client: str, kind: str) -> Step | None:
        steps = self._steps(client, kind)
        return next(iter(steps)) if steps else None

    def put(self, client: str, kind: str, step: Step, reply: Message) -> None:
        steps = self._names.setdefault(client, {}).setdefault(kind, OrderedDict())
        steps[step] = reply
        while len(steps) > self.depth:
            steps.popitem(last=False)

    def names(self) -> int:
        return len(self._names)

    def entries(self) -> list[dict[str, Any]]:
        """A checkpoint-safe list (the safe loader refuses tuple keys)."""
        return [
            {"client": c, "kind": k, "step": list(step), "reply": message_state(m)}
            for c, kinds in self._names.items()
            for k, steps in kinds.items()
            for step, m in steps.items()
        ]

    def load(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            step = (int(entry["step"][0]), int(entry["step"][1]))
            self.put(entry["client"], entry["kind"], step, message_from_state(entry["reply"]))
