"""The bounded label sets of the metrics, and their latency buckets.

A value outside a label's set is folded into ``"other"``, so no peer can grow the number of
time series; every combination is created at start-up (see :mod:`workers.ops.metrics`).
"""

from __future__ import annotations

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
