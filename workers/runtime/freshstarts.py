"""Which clients of a relay started afresh, and how often they may make it ask the server.

A client that says hello without a resume point may be starting a new run: at its first
well-formed step the relay joins the server again, whose welcome names the run the chain
trains in now. That join costs the server a handshake, a log line and a welcome; a client
that says hello afresh and resends a step over and over (from as many source addresses as
it likes: the hello rate is per address) made a relay rejoin 80 times a second. So the
joins are bounded per client name, with a token bucket like the hellos' (``sl_bound_hits_total
{table="relay_rejoins"}``); one over it is refused as a retryable ``overloaded``, and the
client stays marked, so its next step asks once the bucket has a token again. Pure code:
the relay does the joining.
"""

from __future__ import annotations

from collections.abc import Callable

from sl_pipeline.errors import OverloadedError
from workers.runtime.bounded import LruTable, RateLimiter, no_hit


class FreshStarts:
    def __init__(
        self, rate_per_s: float, burst: int, limit: int, on_hit: Callable[[], None] = no_hit
    ) -> None:
        self.rate_per_s, self.burst = rate_per_s, max(1, burst)
        self.rate = RateLimiter(rate_per_s, burst, max(1, limit), on_hit)
        # names whose next well-formed step asks the server (at most ``limit``, oldest go)
        self._marked: LruTable[str, bool] = LruTable(max(1, limit))

    def mark(self, name: str) -> None:
        """``name`` said hello without a resume point: perhaps a new run."""
        self._marked.put(name, True)

    def __contains__(self, name: object) -> bool:
        return name in self._marked

    def allow(self, name: str, now_s: float) -> None:
        """A join of the server for ``name`` may go ahead now, else ``OverloadedError``."""
        if not self.rate.allow(name, now_s):
            raise OverloadedError(
                f"{name} started afresh too often: the relay asks the server about a "
                f"client's fresh start {self.rate_per_s:g} times a second after a burst of "
                f"{self.burst} (relay.rejoins_per_s, relay.rejoin_burst); retry later"
            )

    def asked(self, name: str) -> None:
        """The server answered about ``name``: its next steps ask nothing."""
        self._marked.pop(name)
