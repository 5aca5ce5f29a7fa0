"""The u-shaped topology's engine: the server holds only the middle of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ProtocolError, SLError, StepLostError
from sl_pipeline.messages import Kind, Message, error_message
from sl_pipeline.tensors import wire_tensors
from workers.runtime.bounded import LruTable
from workers.server.engines.base import Engine, Reply, log, run_segment

# A client whose step was abandoned for time and whose gradient then came late is slow, not
# gone: its bound doubles (at most this many times) until its steps fit the smaller bound
# again. Without it, two clients slower than the bound abandon each other's steps forever.
MAX_GRACE_DOUBLINGS = 2


@dataclass(frozen=True)
class OpenStep:
    """The one step whose forward went out and whose backward has not come back yet."""

    client: str
    epoch: int
    step: int
    act: torch.Tensor
    out: torch.Tensor
    since: float  # when its client began holding the server (a step it replaced: earlier)

    def answers(self, msg: Message) -> bool:
        return (self.client, self.epoch, self.step) == (msg.client, msg.epoch, msg.step)


class MiddleEngine(Engine):
    """U-shaped: the server holds only the middle; labels and loss stay with the client.

    FORWARD(act) -> RESULT(out of the middle); then BACKWARD(grad of out) -> BACKWARD(grad
    at the client's cut). One step is open at a time: the graph of the open step must not
    see an optimizer update from another client's step, so other clients' FORWARDs wait
    (in arrival order) until the open step's BACKWARD has been applied.

    An open step is *abandoned* (nothing of it applied, its forward's state dropped) when
    its client leaves (:meth:`forget`: bye, its session dropped or replaced), or when it
    held the server ``server.open_step_s`` while another client's forward waited
    (:meth:`at`, fed the server's clock). The next waiting forward is served then; the
    abandoned step's late gradient is answered ``step_lost`` and its client redoes it.

    That late gradient shows its client is slow, not gone, so its bound doubles (at most
    :data:`MAX_GRACE_DOUBLINGS` times: 4x) and halves again once a step of it is applied
    within the smaller bound. A client that never sends a gradient earns no grace.
    """

    def __init__(self, module: nn.Module, cfg: ServerConfig) -> None:
        super().__init__(module, cfg)
        self.open_step_s = cfg.server.open_step_s
        self.abandoned = 0  # open steps abandoned (their client left, or no gradient in time)
        self._open: OpenStep | None = None
        self._waiting: LruTable[str, tuple[bytes, Message]] = LruTable(
            max(1, cfg.server.max_names), lambda: self.on_bound("waiting")
        )
        # why each client's last abandoned step was abandoned (and its output's shape): its
        # late gradient is told
        self._why: LruTable[str, tuple[int, int, str, torch.Size]] = LruTable(
            max(1, cfg.server.max_names)
        )
        self._queued_at = 0.0  # when the queue last went from empty to waiting
        # doublings of each slow client's bound (its late gradients earned them)
        self._grace: LruTable[str, int] = LruTable(max(1, cfg.server.max_names))

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.kind is Kind.FORWARD:
            if "labels" in msg.tensors:
                raise ProtocolError(
                    "u-shaped topology: labels stay at the client; do not send them"
                )
            if self._open is not None and self._open.client != msg.client:
                self.activations(msg, False)  # a bad forward is refused now, to its sender
                # answered when the open step ends; a full queue refuses the newcomer
                if not self._waiting:
                    self._queued_at = self.now  # the bound counts while someone waits
                self._waiting.add(msg.client, (identity, msg), "clients waiting for a step")
                return self._expire()  # the open step may have held the server too long
            # served now: a copy of it still queued (its step's client left, and it resent)
            # would open the same step again later, an answer its client never asked for
            self._waiting.pop(msg.client)
            return [self._forward(identity, msg)]
        if msg.kind is Kind.BACKWARD:
            return [(identity, self._backward(msg)), *self._next_waiting()]
        return super().handle(identity, msg)

    def at(self, now: float) -> list[Reply]:
        super().at(now)
        return self._expire()

    def replays(self, msg: Message, applied: bool) -> bool:
        """A resent forward gets its cached output while its step is open or once it was
        applied; a step that was abandoned, or lost in a restart, is opened afresh (its
        old output would only be answered ``step_lost`` again, every time it is redone)."""
        if msg.kind is not Kind.FORWARD or applied:
            return True
        return self._open is not None and self._open.answers(msg)

    def _expire(self) -> list[Reply]:
        """Abandon the open step if it held the server ``open_step_s`` while others wait."""
        held = self._open
        if held is None or not self._waiting or self.open_step_s <= 0:
            return []
        bound_s = self.bound_for(held.client)
        if self.now - max(held.since, self._queued_at) < bound_s:
            return []
        waited = f"{len(self._waiting)} other client(s) waited"
        within = f"server.open_step_s = {self.open_step_s:g}s"
        if bound_s != self.open_step_s:
            within = f"{bound_s:g}s ({within}, doubled for a client seen to be slow)"
        self._abandon(f"no gradient within {within}; {waited}")
        return self._next_waiting()

    def bound_for(self, client: str) -> float:
        """How long ``client``'s open step may hold the server while others wait."""
        return self.open_step_s * 2 ** (self._grace.get(client) or 0)

    def _abandon(self, why: str) -> None:
        held = self._open
        assert held is not None
        self._open = None  # its graph goes with it; no update was computed for it
        self.abandoned += 1
        self._why.put(held.client, (held.epoch, held.step, why, held.out.shape))
        self.on_bound("open_steps")
        log.warning(
            "abandoned %s's open step (%d, %d): %s; nothing of it was applied, and its "
            "gradient, if it comes, is answered step_lost",
            *(held.client, held.epoch, held.step, why),
        )

    def _next_waiting(self) -> list[Reply]:
        """The forward queued longest opens the next step. One that fails is refused to its
        own sender (never to the client whose step just ended, which got its gradient and
        must not redo an applied step), and the next one in the queue is served."""
        refused: list[Reply] = []
        while self._waiting:
            self.settle()  # the next client's forward must see this step's update
            waiting = self._waiting.pop(next(iter(self._waiting)))
            assert waiting is not None
            identity, msg = waiting
            try:
                return [*refused, self._forward(identity, msg)]
            except Exception as exc:  # a peer's message: it ends as that peer's error reply
                failure = exc if isinstance(exc, SLError) else None
                code = failure.code if failure else "internal"
                reason = failure.message if failure else "the message could not be handled"
                log.warning("refused %s's queued forward (%s): %s", msg.client, code, exc)
                refused.append((identity, error_message(code, reason, request=msg)))
        return refused

    def _forward(self, identity: bytes, msg: Message) -> Reply:
        act = self.activations(msg, True)
        out = run_segment(self.model, act)
        held = self._open
        # a client that replaces its own open step goes on holding the server: the bound
        # counts from its first, or it could hold it forever with ever new forwards
        since = held.since if held is not None and held.client == msg.client else self.now
        self._open = OpenStep(msg.client, msg.epoch, msg.step, act, out, since)
        return identity, msg.reply(Kind.RESULT, tensors=wire_tensors("out", out, self.wire_dtype))

    def _backward(self, msg: Message) -> Message:
        held = self._open
        if held is None or not held.answers(msg):
            # this server restarted, or abandoned the step (its client left, or sent no
            # gradient in time): the client redoes the step from its forward
            raise StepLostError(self._lost_reason(msg))
        # A bad gradient raises before anything changes and leaves the step open for a resend.
        (grad,) = self.backprop_output(msg, held.out, [held.act])
        self._open = None
        self._ease_grace(held)
        tensors = wire_tensors("grad", grad, self.wire_dtype, self.residuals, msg.client)
        return msg.reply(Kind.BACKWARD, tensors=tensors)

    def _lost_reason(self, msg: Message) -> str:
        """Why ``msg``'s step is not open: its client is told why it was abandoned (a head
        slower than the bound is abandoned at every redo while others wait: it must know)."""
        why = self._why.get(msg.client)
        if why is None or why[:2] != (msg.epoch, msg.step):
            return "backward for a step this server has no open forward for"
        line = f"this server abandoned your open step {why[:2]}: {why[2]}"
        grad = msg.tensors.get("grad")
        if "open_step_s" in why[2] and grad is not None and grad.shape == why[3]:
            # a gradient of the step's shape (a BACKWARD without one costs nothing to send);
            # one late gradient earns one doubling, not a resend
            self._why.pop(msg.client)
            doublings = min(MAX_GRACE_DOUBLINGS, (self._grace.get(msg.client) or 0) + 1)
            self._grace.put(msg.client, doublings)
            line += (
                "; a step whose gradient takes longer than that is abandoned again at each "
                "redo while other clients wait: ask the operator to raise server.open_step_s"
            )
        return line

    def _ease_grace(self, applied: OpenStep) -> None:
        """A slow client's step that fitted half its bound gives one doubling back."""
        doublings = self._grace.get(applied.client)
        if doublings and self.now - applied.since <= self.bound_for(applied.client) / 2:
            self._grace.put(applied.client, doublings - 1)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def forget(self, client: str) -> list[Reply]:
        """``client`` left: its queued forward goes, and its open step is abandoned (only
        its own: the name is the session's, never one a message claims)."""
        self._waiting.pop(client)
        if self._open is None or self._open.client != client:
            return []
        self._abandon("its client left (bye, or its session was dropped or replaced)")
        return self._next_waiting()
