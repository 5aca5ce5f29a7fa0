"""The bounded label sets of the metrics, and their latency buckets.

A value outside a label's set is folded into ``"other"``, so no peer can grow the number of
time series; every combination is created at start-up (see :mod:`workers.ops.metrics`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

ROLES: frozenset[str] = frozenset({"server", "client", "relay"})
DIRECTIONS: tuple[str, ...] = ("sent", "received")
MESSAGE_KINDS: tuple[str, ...] = (
    "hello",
    "welcome",
    "forward",
    "backward",
    "evaluate",
    "predict",
    "result",
    "heartbeat",
    "error",
    "bye",
    "resume",
    "weights",
    "other",
)
REJECT_REASONS: tuple[str, ...] = (
    "malformed",
    "oversized",
    "bad_tag",
    "replay",
    "not_admitted",
    "version",
    "unauthenticated",
    "overloaded",
    "internal",
    "other",
)
#: Tables a peer's messages fill, each with a bound; ``sl_bound_hits_total`` counts the hits.
BOUNDED_TABLES: tuple[str, ...] = (
    "pending_handshakes",
    "hello_rate",
    "reply_cache",
    "reply_cache_bytes",
    "relay_cache",
    "relay_rejoins",
    "round_table",
    "waiting",
    "inflight_bytes",
    "empty_runs",
    "idle_runs",
    "ended_runs",
    "open_steps",
    "gate_tokens",
    "outbound_bytes",
    "connections_per_key",
    "ops_new_connections",
    "ops_connections",
    "ops_stalled",
    "inbound_backlog",
    "other",
)
HANDSHAKE_RESULTS: tuple[str, ...] = ("ok", "not_admitted", "bad_handshake", "version")
PRIVACY_MECHANISMS: tuple[str, ...] = ("dpsgd", "activation_noise")
RUN_SERIES = 20  # runs whose series a server exports (bounded over months of runs)

#: 1 ms .. 10 s, roughly three buckets per decade: one step's round trip, or the
#: server's compute for one batch, on CPU or GPU, over a LAN or a WAN.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class NameLabels:
    """How a name that may say who a tenant is (a run id, a client's name) shows as a label
    value: as it is, or, once :meth:`hash_with` gave a key, as ``h-`` and 12 hex digits of
    its HMAC-SHA256 under that key. Without the key, nobody can tell which name a hash
    stands for, nor test a guess (a hospital's name is easy to guess; the scraper's
    token is no key for this)."""

    def __init__(self) -> None:
        self._key: bytes | None = None

    def hash_with(self, secret: bytes) -> None:
        """Hash from now on, with a key derived from ``secret`` (the worker's private key)."""
        self._key = hmac.new(secret, b"sl-pipeline metrics label names", hashlib.sha256).digest()

    @property
    def hashed(self) -> bool:
        return self._key is not None

    def __call__(self, name: str) -> str:
        if self._key is None:
            return name
        data = name.encode("utf-8", "surrogatepass")
        return "h-" + hmac.new(self._key, data, hashlib.sha256).hexdigest()[:12]

    def legend(self, names: Iterable[str]) -> dict[str, str]:
        """Each hashed label -> the name it stands for (empty when names are not hashed)."""
        return {self(name): name for name in names} if self.hashed else {}
