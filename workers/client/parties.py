"""How long a client waits for other parties: one window, ``client.wait_for_parties_s``.

Where the server holds a client's reply until other parties have sent theirs (a vertical
batch's other parts, the other party's PSI post, a round-robin turn, a SplitFed round), no
round trip of ours predicts the wait: the link waits a fixed time per try, then rejoins and
resends, and its resends are not cut short by ``client.retry_for_s`` (a slow honest party
must not end the others). That left only a count as the bound: 100 tries of
``client.timeout_s`` (50 minutes by default) for a vertical party, of 60 s for a PSI post, of
900 s for a turn (25 hours; a SplitFed round: 20 attempts of that). A party that never
comes, or a server that never answers, held the client that long.

So each such request, and each SplitFed round across its attempts, is bounded by time too:
past ``client.wait_for_parties_s`` (0: 15 minutes for a vertical party, 24 hours for a
round-robin or SplitFed member) from its first send it ends the client with a
``TransportError`` (exit 5) naming the key and what was waited for. The worker saves its
state on that error as on a lost server, so the same command carries on once the others run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from sl_pipeline.config import ClientSection
from sl_pipeline.errors import TransportError
from sl_pipeline.messages import Kind, Message

T = TypeVar("T")

# client.wait_for_parties_s = 0 (the default): the window by topology. A vertical party or a
# PSI post waits for partners that run beside it; a round-robin or SplitFed member waits
# through the others' epochs, which on real data take hours (a turn's count alone allowed 25).
AUTO_WAIT_S = {"vertical": 900.0, "roundrobin": 86400.0, "splitfed": 86400.0}

# What the server waits for before it answers, by topology (the key names what to raise).
WAITS_FOR = {
    "vertical": "the other parties' parts of this batch",
    "roundrobin": "the turns of the members before this one",
    "splitfed": "every member of this round",
}


def waited_for(topology: str, message: Message) -> str:
    """What a request of ``topology`` waits for at the server, in words."""
    if message.kind is Kind.WEIGHTS and message.meta.get("op") == "psi":
        return "the other party's PSI post"
    return WAITS_FOR.get(topology, "the other parties")


def window_s(client: ClientSection, topology: str) -> float:
    """The window of a wait for other parties: ``client.wait_for_parties_s``, or where that
    is 0, the topology's own (:data:`AUTO_WAIT_S`)."""
    return client.wait_for_parties_s or AUTO_WAIT_S.get(topology, 900.0)


class PartyWindow:
    """A wait for other parties, bounded by ``window_s`` from its start (this object's
    creation): ``within`` awaits a request, or raises ``TransportError`` once the window
    is spent. ``what`` is what was asked; ``waits_for`` what the server waits for."""

    def __init__(self, window_s: float, what: str, waits_for: str) -> None:
        self.window_s, self.what, self.waits_for = window_s, what, waits_for
        self.deadline = asyncio.get_running_loop().time() + window_s

    async def within(self, waiting: Awaitable[T]) -> T:
        timeout = asyncio.timeout_at(self.deadline)
        try:
            async with timeout:
                return await waiting
        except TimeoutError:
            if not timeout.expired():  # a TimeoutError of the request's own (ReplyTimeoutError)
                raise
        raise self.spent()

    def spent(self) -> TransportError:
        return TransportError(
            f"no answer to {self.what} within {self.window_s:g}s (client.wait_for_parties_s "
            f"= {self.window_s:g}): the server still waits for {self.waits_for}, or answers "
            "none; the same command carries on once they run, or let it wait longer with "
            "--set client.wait_for_parties_s=SECONDS"
        )


async def for_parties(
    waiting: Awaitable[T], fixed: bool, client: ClientSection, topology: str, message: Message
) -> T:
    """``waiting`` (the request ``message``); when its wait is ``fixed`` (it waits for other
    parties), bounded by ``client.wait_for_parties_s`` from now. Else the link bounds it by
    ``client.retry_for_s`` (:class:`workers.client.link.Unanswered`)."""
    if not fixed:
        return await waiting
    what = f"its {message.kind.value} of step ({message.epoch}, {message.step})"
    if message.meta.get("op") == "psi":  # its step is a round's nonce, no training step
        what = "its PSI post"
    window = PartyWindow(window_s(client, topology), what, waited_for(topology, message))
    return await window.within(waiting)


__all__ = ["AUTO_WAIT_S", "WAITS_FOR", "PartyWindow", "for_parties", "waited_for", "window_s"]
