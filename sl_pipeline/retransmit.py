"""How long a client waits for a reply before it retransmits: TCP's timer (RFC 6298).

Sans-IO: :class:`RetransmitTimer` is told the round trips it measured and the timeouts it
suffered, and says how long to wait next. A round trip here is the time from sending a
request to its reply, so it includes the peer's compute time for the step: the wait
follows the step time as well as the network. Estimates are kept per request kind (a
forward step and an evaluation batch take different times).

* first sample R: ``SRTT = R``, ``RTTVAR = R / 2``;
* later samples: ``RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|``, ``SRTT = 7/8 SRTT + 1/8 R``;
* ``RTO = SRTT + max(granularity, 4 RTTVAR)``, at least ``min_s``, at most ``max_s``;
* each timeout doubles the kind's RTO (exponential backoff, capped at ``max_s``) until a
  reply to a request that was *not* retransmitted gives a fresh sample (Karn's rule: a
  reply after a retransmission cannot say which send it answers).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

ALPHA = 1 / 8
BETA = 1 / 4
K = 4
GRANULARITY_S = 0.01


@dataclass
class _Estimate:
    srtt: float | None = None
    rttvar: float = 0.0
    backoff: int = 0  # timeouts since the last fresh sample


class RetransmitTimer:
    """The reply wait per request kind; ``max_s`` is the configured ``client.timeout_s``."""

    def __init__(self, max_s: float, min_s: float = 0.2, initial_s: float = 1.0) -> None:
        if not max_s > 0:
            raise ConfigError(f"a reply timeout of {max_s}s cannot be waited for; make it > 0")
        self.max_s = max_s
        self.min_s = min(min_s, max_s)
        self.initial_s = min(max(initial_s, self.min_s), max_s)
        self._kinds: dict[str, _Estimate] = {}

    def _estimate(self, kind: str) -> _Estimate:
        return self._kinds.setdefault(kind, _Estimate())

    def base(self, kind: str) -> float:
        """The wait without backoff: the initial value until the kind has a sample."""
        e = self._estimate(kind)
        if e.srtt is None:
            return self.initial_s
        rto = e.srtt + max(GRANULARITY_S, K * e.rttvar)
        return min(max(rto, self.min_s), self.max_s)

    def timeout(self, kind: str) -> float:
        """How long to wait for the next reply of ``kind``."""
        return min(self.base(kind) * 2 ** self._estimate(kind).backoff, self.max_s)

    def sample(self, kind: str, rtt_s: float) -> None:
        """A reply to a request sent once came back after ``rtt_s``."""
        e = self._estimate(kind)
        rtt_s = max(0.0, rtt_s)
        if e.srtt is None:
            e.srtt, e.rttvar = rtt_s, rtt_s / 2
        else:
            e.rttvar = (1 - BETA) * e.rttvar + BETA * abs(e.srtt - rtt_s)
            e.srtt = (1 - ALPHA) * e.srtt + ALPHA * rtt_s
        e.backoff = 0

    def expired(self, kind: str) -> None:
        """The wait for a reply of ``kind`` ran out: back off (doubling, capped)."""
        e = self._estimate(kind)
        if self.base(kind) * 2**e.backoff < self.max_s:
            e.backoff += 1

    def srtt(self, kind: str) -> float | None:
        return self._estimate(kind).srtt


__all__ = ["RetransmitTimer"]
