"""Recovering the steps a relay lost: its client resends them, the same requests again.

A relay that checkpoints every N > 1 steps (``checkpoint.every_steps``) loses up to N-1
applied steps in a crash, while its client and the next hop (the server) applied them. The
client cannot redo them the way it redoes steps a *server* lost (rewind, draw afresh): the
server applied them already, and answers a step it holds from its reply cache, with the
gradients of the rows it was first sent. So the relay's welcome says ``recover = "resend"``
and the client, which kept the requests of its last steps (:class:`RecordedSteps`), sends
those after the relay's ``applied`` again, byte for byte the same: the restarted relay runs
its segment on them from the same weights and RNG, the server answers each from its cache
(the same request: :func:`sl_pipeline.messages.request_digest`), and the relay applies the
same updates again. The client keeps its own state: it applied those steps once, and a
DP-SGD client releases nothing new (no rows drawn, no noise added). The requests go into the
client's checkpoint too (:meth:`RecordedSteps.state`), so a client killed together with its
relay still resends them from there.

A peer that cannot resend (an older client, a relay in front of this one) is refused at its
hello by a relay that checkpoints every N > 1 steps (:func:`check_resends`).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from sl_pipeline.errors import CheckpointError, ConfigError, StaleStepError, VersionError
from sl_pipeline.messages import Kind, Message, message_from_state, message_state

log = logging.getLogger("sl_pipeline.client")
RESEND = "resend"  # the welcome's ``recover``, and what a hello's ``recover`` lists
Step = tuple[int, int]
NOTHING: Step = (-1, -1)  # before the client's first step
MAX_KEPT = 256  # requests kept at most, whatever a relay's checkpoint_every says


def check_resends(hello: dict[str, Any], name: str, relay: str, every: int) -> None:
    """A relay that checkpoints every N > 1 steps takes only peers that resend their
    recorded steps after a restart of it (hello ``recover`` lists ``resend``): a peer that
    does not would carry on past the steps the relay lost. Inference loses nothing."""
    if every <= 1 or hello.get("intent", "train") != "train":
        return
    recover = hello.get("recover")
    if isinstance(recover, list) and RESEND in recover:
        return
    fix = (
        "a relay resends no steps of its clients"
        if hello.get("role") == "relay"
        else f"upgrade {name} to this sl-pipeline"
    )
    raise VersionError(
        f"relay {relay} checkpoints every {every} steps and {name} cannot resend the steps "
        f'a restart of it loses (its hello has no recover = ["resend"]): {fix}, or set '
        f"checkpoint.every_steps = 1 in {relay}'s config"
    )


def check_server_every(welcome: dict[str, Any], upstream: str) -> None:
    """A server that checkpoints every N > 1 steps loses up to N-1 applied steps in a crash
    and counts on its clients to rewind and redo them; a relay cannot (its segment applied
    them, and its clients resend to it rather than rewind), so it would carry on past them."""
    every = int(welcome.get("checkpoint_every") or 1)
    if every > 1:
        raise ConfigError(
            f"the server at relay.upstream = {upstream!r} checkpoints every {every} steps, "
            "and a relay cannot rewind the steps a restart of it between checkpoints loses: "
            "set checkpoint.every_steps = 1 in the server's config"
        )


def check_not_stale(step: Step, newest: Step | None, client: str) -> None:
    """A relay applies no step older than the newest it applied for ``client`` and no longer
    holds the reply of (as the server refuses it): the server may still answer it from its
    cache, and the relay would apply it a second time."""
    if newest is not None and step < newest:
        raise StaleStepError(
            f"step {step} is older than the steps this relay applied for {client} (up to "
            f"{newest}) and its reply is no longer kept: it is refused rather than applied "
            "again; resume the client from its checkpoint ([checkpoint] dir)"
        )


class RecordedSteps:
    """The requests of the client's last steps; off (nothing kept) until a relay says it
    checkpoints every N > 1 steps. ``resent`` counts the steps sent again."""

    def __init__(self) -> None:
        self.kept: deque[Message] | None = None
        self.whole = False  # holds every step since the client's first (none evicted)
        self.resent = 0

    def configure(self, welcome: dict[str, Any], in_flight: int, fresh: bool) -> None:
        """Keep enough requests to reach back past everything the relay may lose (``fresh``:
        this process has taken no step yet, so from its first step on nothing is missing)."""
        every = min(int(welcome.get("checkpoint_every") or 1), MAX_KEPT)
        if welcome.get("recover") != RESEND or every <= 1:
            return
        capacity = every + in_flight + 1
        if self.kept is None or (self.kept.maxlen or 0) < capacity:
            self.whole = fresh if self.kept is None else self.whole
            self.kept = deque(self.kept or (), maxlen=capacity)

    def record(self, msg: Message) -> None:
        """A training step's request, as it was sent."""
        if self.kept is None or msg.kind is not Kind.FORWARD:
            return
        if self.kept and (msg.epoch, msg.step) <= _step(self.kept[-1]):
            return  # sent again (a resend): the first send is the one kept
        if len(self.kept) == self.kept.maxlen:
            self.whole = False
        self.kept.append(msg)

    def lost(self, welcome: dict[str, Any], last_applied: Step | None) -> list[Message] | None:
        """The requests to send again, oldest first, when the relay holds fewer of our steps
        than we sent: every kept one after its ``applied``, those in flight too (a client
        restarted from its checkpoint recomputes them, not byte for byte where it pipelines);
        [] when it holds them all; None when some are no longer kept."""
        applied = welcome.get("applied")
        held = (int(applied[0]), int(applied[1])) if applied else NOTHING
        if self.kept is None:  # a relay without checkpoints (or of an older version)
            return None if last_applied is not None and held < last_applied else []
        newest = max([_step(m) for m in self.kept] + [last_applied or NOTHING])
        if held >= newest:
            return []
        steps = [_step(m) for m in self.kept]
        if held not in steps and not (held == NOTHING and self.whole):
            return None
        return [m for m in self.kept if held < _step(m)]

    def state(self) -> dict[str, Any] | None:
        """What a client checkpoint keeps of them (with its weights, in the same file): a
        client restarted from it still resends what its restarted relay lost."""
        if self.kept is None:
            return None
        requests = [message_state(m) for m in self.kept]
        return {"capacity": self.kept.maxlen or 0, "whole": self.whole, "requests": requests}

    def load(self, state: Any) -> None:
        """Undo :meth:`state` (None: a checkpoint with none kept, or of an older version)."""
        if state is None:
            return
        try:
            capacity = max(1, min(int(state["capacity"]), 2 * MAX_KEPT))
            kept = [message_from_state(m) for m in state["requests"]][-capacity:]
            self.kept, self.whole = deque(kept, maxlen=capacity), bool(state["whole"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot restore the recorded requests: {exc}") from None


def _step(msg: Message) -> Step:
    return (msg.epoch, msg.step)
