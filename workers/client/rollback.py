"""Rolling a client back to the step a restarted server resumed from.

A server that checkpoints every N > 1 steps (``checkpoint.every_steps``) loses up to N-1
applied steps in a crash. Its welcome says which step of this client it holds (``applied``)
and how often it checkpoints (``checkpoint_every``); the client keeps an undo point after
each of its last steps (:class:`workers.runtime.checkpoint.SnapshotRing`, enough for N steps) and,
when the server is behind it, rewinds to the matching point and redoes the steps from there:
the server applies each of them once, nothing is applied twice and nothing is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sl_pipeline.messages import Kind, Message
from workers.runtime.checkpoint import SnapshotRing

log = logging.getLogger("sl_pipeline.client")
Step = tuple[int, int]
NOTHING: Step = (-1, -1)  # before this client's first step


class Rewind(Exception):
    """Raised out of a rejoin: restart training from ``state`` (the undo point at ``step``)."""

    def __init__(self, step: Step, state: dict[str, Any]) -> None:
        super().__init__(f"rewind to {step}")
        self.step = step
        self.state = state


class UndoPoints:
    """The client's undo points; off (no copies) until a server checkpoints every N > 1."""

    def __init__(self) -> None:
        self.ring: SnapshotRing | None = None
        self.rewinds = 0
        self.redone: tuple[Step, Step] | None = None  # after a rewind: (held, last applied]

    def configure(self, server_every: int, in_flight: int) -> None:
        """Keep enough points to reach back past everything the server may lose."""
        if server_every <= 1:
            return
        capacity = server_every + in_flight + 1
        if self.ring is None or self.ring.capacity < capacity:
            self.ring = SnapshotRing(capacity)  # set at the first join, before any step

    def record(self, step: Step, state: Callable[[], dict[str, Any]]) -> None:
        """An undo point after ``step`` (``state`` is only built when points are kept)."""
        if self.ring is not None:
            self.ring.push(step, state())

    def check(self, server_step: Step, last_applied: Step) -> None:
        """Raise :class:`Rewind` if the server holds fewer of our steps and a point exists."""
        state = self.ring.get(server_step) if self.ring is not None else None
        if state is None:
            return
        assert self.ring is not None
        self.ring.discard_after(server_step)
        self.rewinds += 1
        held, until = self.redone or (server_step, last_applied)
        self.redone = (min(held, server_step), max(until, last_applied))
        log.warning(
            "the server resumed at our step %s, behind our %s: rewinding to it and redoing the "
            "steps after it",
            server_step,
            last_applied,
        )
        raise Rewind(server_step, state)

    def marked(self, msg: Message) -> Message:
        """``msg``, with meta ``redo`` if it redoes a step sent before the rewind (its inputs
        may be new: a DP-SGD client draws its rows afresh). A next hop that holds that step
        refuses such a request unless it is the same one (``RedoError``), instead of
        answering it with the first inputs' gradients."""
        if msg.kind is not Kind.FORWARD or self.redone is None:
            return msg
        held, until = self.redone
        if not held < (msg.epoch, msg.step) <= until:
            return msg
        return replace(msg, meta={**msg.meta, "redo": True})

    def after_join(
        self, welcome: dict[str, Any], last_applied: Step | None, in_flight: int, peer: str
    ) -> None:
        """The server (or relay) says which step of ours it applied last; if it is behind
        us, rewind to that step when an undo point exists (it checkpoints every N > 1
        steps), else say what was lost."""
        if welcome.get("recover") == "resend":
            return  # a relay: this client resends its steps instead (Upstream.resend_lost)
        applied = welcome.get("applied")
        self.configure(int(welcome.get("checkpoint_every") or 1), in_flight)
        if last_applied is None:
            return
        server_step = (int(applied[0]), int(applied[1])) if applied else NOTHING
        if server_step < last_applied:
            self.check(server_step, last_applied)
            log.error(
                "the %s lost steps after %s that this client applied (up to %s); "
                "exactly-once needs the %s's checkpoint.dir, and a rewind needs an undo point "
                "(checkpoint.every_steps > 1 is announced at join)",
                peer,
                server_step,
                last_applied,
                peer,
            )
