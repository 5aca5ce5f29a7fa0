"""How often a peer may say hello: the token buckets a listening worker draws from before
any handshake work (a hello costs the server its Diffie-Hellman operations).

Sans-IO: keys and addresses in, a yes or no out; a test drives it with bytes and a clock.
Where the connection gate admits connections (every secure worker), it has proved the
admitted key before the connection sent a byte of its hello, so the buckets are that key's
(``hellos_per_s`` after a burst of ``hello_burst``) and, on a server whose groups have
places of their own, its group's as well (the same rate for the group's keys together: a
group's many keys cost the server no more handshake work than one): a flood from one key,
or from one group's keys, spends their own buckets and never another group's, whatever
address it comes from (one NAT, one host). Without the gate (``--insecure``) no key is
known before the hello, and the bucket is the source address's, as it was for everyone."""

from __future__ import annotations

from collections.abc import Callable

from sl_pipeline.errors import OverloadedError
from workers.runtime.bounded import RateLimiter, no_hit


class HelloRates:
    """Token buckets per admitted key, per group (where groups have places), per address."""

    def __init__(self, rate_per_s: float, burst: int, on_hit: Callable[[], None] = no_hit) -> None:
        self.by_source = RateLimiter(rate_per_s, burst, on_hit=on_hit)
        self.by_key = RateLimiter(rate_per_s, burst, on_hit=on_hit)
        self.by_group = RateLimiter(rate_per_s, burst, on_hit=on_hit)
        # an admitted key's group, where groups have places of their own; else None
        self.group_of: Callable[[bytes], str | None] = lambda key: None

    def allow(self, key: bytes | None, source: str, now_s: float) -> bool:
        """Whether a hello on a connection the gate admitted with ``key`` (None: no gate)
        from ``source`` may be answered now; a refused one spends no other bucket."""
        if key is None:
            return self.by_source.allow(source, now_s)
        if not self.by_key.allow(key.hex(), now_s):
            return False
        group = self.group_of(key)
        return group is None or self.by_group.allow(group, now_s)

    def check(self, key: bytes | None, source: str, now_s: float) -> None:
        """:meth:`allow`, or the refusal (``overloaded``: the peer retries later)."""
        if not self.allow(key, source, now_s):
            who = f"this connection's key (from {source})" if key else source
            raise OverloadedError(f"too many hellos from {who}; retry later")


__all__ = ["HelloRates"]
