"""How often each client may start a run: ``server.run_starts_per_min`` after a burst of
as many. Each run that ends costs the server a saved model and fsynced checkpoints on the
event loop every client shares; one admitted key starting and finishing runs at its hello
rate made 113 in 10 s (a red team's). Sans-IO: names and a clock in, a refusal out."""

from __future__ import annotations

from collections.abc import Sequence

from sl_pipeline.errors import OverloadedError
from workers.runtime.bounded import RateLimiter

# The clients behind one relay together start at most this many times one client's starts: a
# relay names its clients itself, so without it one hostile (enrolled) relay made as many
# ``relay/client`` buckets as names it invented
RELAY_SHARE = 16


class RunStarts:
    """A token bucket per starter, and one per relay for all its clients; ``per_min`` 0
    bounds nothing."""

    def __init__(self, per_min: float = 0.0) -> None:
        burst = max(1, round(per_min))
        self.per_min = per_min
        self._buckets = RateLimiter(per_min / 60.0, burst) if per_min > 0 else None
        self._relays = (
            RateLimiter(RELAY_SHARE * per_min / 60.0, RELAY_SHARE * burst) if per_min > 0 else None
        )

    def check(self, starter: str, now: float) -> None:
        """Refuse (``overloaded``: the client retries) a start over ``starter``'s rate, or
        over its relay's; it takes nothing (a start refused later for another reason costs
        no token)."""
        if self._buckets is None or self._relays is None:
            return
        if not self._buckets.ready(starter, now):
            raise OverloadedError(
                f"{starter} starts runs faster than server.run_starts_per_min = "
                f"{self.per_min:g} allows (after a burst of {self._buckets.burst}); this run "
                "waits its turn"
            )
        relay = relay_of(starter)
        if relay and not self._relays.ready(relay, now):
            raise OverloadedError(
                f"the clients behind relay {relay} start runs faster than {RELAY_SHARE} times "
                f"server.run_starts_per_min = {self.per_min:g} allows together (after a burst "
                f"of {self._relays.burst}); this run waits its turn"
            )

    def took(self, starter: str, now: float) -> None:
        """A run ``starter`` asked for started: one of its starts is spent, and its relay's."""
        if self._buckets is None or self._relays is None:
            return
        self._buckets.allow(starter, now)
        relay = relay_of(starter)
        if relay:
            self._relays.allow(relay, now)


def relay_of(starter: str) -> str:
    """The relay of a ``relay/client`` starter, else "" (an admitted name holds no "/")."""
    relay, slash, _ = starter.partition("/")
    return relay if slash else ""


def starter_of(
    peer_name: str, peer_key: str, client: str, relays: Sequence[str], address: str
) -> str:
    """Whose starts a training message's new run counts against: the client's own name; a
    client behind a relay as ``relay/client`` (the relay's one bucket let one relayed
    client's start refuse another key's); an unproven ``--insecure`` name by its address, as
    its hellos are (five claimed names from one address each started a run)."""
    if peer_key == "insecure":
        return f"address {address}"
    return client if peer_name in relays else peer_name


__all__ = ["RELAY_SHARE", "RunStarts", "relay_of", "starter_of"]
