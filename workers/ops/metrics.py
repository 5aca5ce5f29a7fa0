"""Prometheus metrics of one worker process, on a registry of its own.

Every metric is prefixed ``sl_``, carries its unit in its name and has only bounded
labels: a value outside a label's known set is folded into ``"other"`` so that a
misbehaving peer can never grow the number of time series. All label combinations are
created at start-up with a value of 0, so ``rate()`` and the alert rules work from the
first scrape instead of waiting for the first event of each kind.

The full catalogue, with the meaning of each metric, is in ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from workers.ops.clientseries import ClientSeries
from workers.ops.labels import (
    BOUNDED_TABLES,
    DIRECTIONS,
    HANDSHAKE_RESULTS,
    LATENCY_BUCKETS_S,
    MESSAGE_KINDS,
    PRIVACY_MECHANISMS,
    REJECT_REASONS,
    ROLES,
    NameLabels,
)
from workers.ops.runseries import RunSeries

# A ``*_created`` series per counter and histogram doubles the series for no dashboard use.
disable_created_metrics()


def _bounded(value: str, allowed: Iterable[str]) -> str:
    """``value`` lower-cased if it is in ``allowed``, else ``"other"``."""
    value = value.lower()
    return value if value in allowed else "other"


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("sl-pipeline")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class WorkerMetrics:
    """The metrics one worker exports on ``/metrics``.

    ``registry`` defaults to a fresh :class:`CollectorRegistry`, never the global one, so
    that several workers in one process (and tests) do not collide. With
    ``process_collector=True`` the standard ``process_*`` metrics (CPU, resident memory,
    open file descriptors) are exported too: useful for runs that last weeks.
    """

    def __init__(
        self,
        role: str,
        registry: CollectorRegistry | None = None,
        *,
        version: str | None = None,
        process_collector: bool = True,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        self.role = role
        self._message_series: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry

        self._traffic_metrics(reg)
        self._training_metrics(reg)
        self._peer_metrics(reg)
        self._privacy_metrics(reg)
        self._progress_metrics(reg)
        self.names = NameLabels()  # run ids and client names as label values
        self.runs = RunSeries(reg, self.names)
        self.record_run = self.runs.record  # a server's run's progress
        # A server's per-client series: visible after a client's own /metrics is gone.
        self.clients = ClientSeries(reg, self.names) if role == "server" else None
        self.build_info = Info(
            "sl_build", "Version and role of this worker (value is always 1).", registry=reg
        )
        # "worker", not "role": scrape configs label targets with role (no exported_role clash)
        self.build_info.info({"version": version or _package_version(), "worker": role})
        if process_collector:
            ProcessCollector(registry=reg)
        self._init_label_sets()

    def _traffic_metrics(self, reg: CollectorRegistry) -> None:
        """Messages and bytes on the wire, and step latency."""
        self.messages_total = Counter(
            "sl_messages_total",
            "Protocol messages sent or received, by direction and message kind.",
            ["direction", "kind"],
            registry=reg,
        )
        self.bytes_total = Counter(
            "sl_message_bytes_total",
            "Bytes of protocol messages on the wire (encrypted frames), by direction and kind.",
            ["direction", "kind"],
            registry=reg,
        )
        self.step_rtt_seconds = Histogram(
            "sl_step_rtt_seconds",
            "Client: time from sending a FORWARD to applying the returned gradient.",
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.server_compute_seconds = Histogram(
            "sl_server_compute_seconds",
            "Server: time spent computing one step (forward and backward of its part).",
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )

    def _training_metrics(self, reg: CollectorRegistry) -> None:
        """Where training is."""
        self.epoch = Gauge(
            "sl_epoch", "Current training epoch (1-based, as in the logs).", registry=reg
        )
        self.step = Gauge("sl_step", "Global step counter of this worker.", registry=reg)
        self.train_loss = Gauge("sl_train_loss", "Last reported training loss.", registry=reg)
        self.test_accuracy = Gauge(
            "sl_test_accuracy_ratio",
            "Last evaluated test accuracy, between 0 and 1.",
            registry=reg,
        )

    def _peer_metrics(self, reg: CollectorRegistry) -> None:
        """Peers, handshakes and what was refused at the edge."""
        self.peers_connected = Gauge(
            "sl_peers_connected", "Peers with an open connection.", registry=reg
        )
        self.peers_authenticated = Gauge(
            "sl_peers_authenticated",
            "Peers that completed the authenticated handshake.",
            registry=reg,
        )
        self.rejected_messages_total = Counter(
            "sl_rejected_messages_total",
            "Incoming messages dropped at the edge, by reason.",
            ["reason"],
            registry=reg,
        )
        self.bound_hits_total = Counter(
            "sl_bound_hits_total",
            "Times a per-peer or per-name table hit its bound (an entry was refused or evicted).",
            ["table"],
            registry=reg,
        )
        self.handshakes_total = Counter(
            "sl_handshakes_total",
            "Handshakes attempted with this worker, by result.",
            ["result"],
            registry=reg,
        )

    def _privacy_metrics(self, reg: CollectorRegistry) -> None:
        """What the privacy mechanisms spent, and what the detectors saw."""
        self.privacy_epsilon = Gauge(
            "sl_privacy_epsilon",
            "Privacy loss epsilon spent so far, by mechanism (as proven by its accountant).",
            ["mechanism"],
            registry=reg,
        )
        self.privacy_epsilon_budget = Gauge(
            "sl_privacy_epsilon_budget",
            "Target epsilon for the mechanism; 0 when no budget is configured.",
            ["mechanism"],
            registry=reg,
        )
        self.dcor_last = Gauge(
            "sl_dcor_last",
            "Distance correlation between inputs and cut-layer activations, last measurement.",
            registry=reg,
        )
        self.hijack_score = Gauge(
            "sl_hijack_score",
            "Hijack detector: mean label-dependence score of the last window of cut gradients "
            "(same-label minus different-label cosine); NaN before the first window.",
            registry=reg,
        )
        self.hijack_flagged = Gauge(
            "sl_hijack_flagged",
            "1 once the hijack detector flagged the server (its gradients ignore the labels).",
            registry=reg,
        )
        self.hijack_cannot_judge = Gauge(
            "sl_hijack_cannot_judge",
            "1 while the hijack detector's last window was low but cannot be judged: an honest "
            "server would score as low for what this client sends (its own noise).",
            registry=reg,
        )
        self.hijack_reference_score = Gauge(
            "sl_hijack_reference_score",
            "Hijack detector: an honest replica's mean score over the last window (NaN "
            "without a reference: no privacy.noise or privacy.nopeek on this client).",
            registry=reg,
        )

    def _progress_metrics(self, reg: CollectorRegistry) -> None:
        """Applied steps, retries, checkpoints, and whether the work finished."""
        self.finished = Gauge(
            "sl_finished",
            "1 once this worker finished its work normally (a client: its training), else 0.",
            registry=reg,
        )
        self.queue_depth = Gauge(
            "sl_queue_depth", "Requests waiting to be processed by this worker.", registry=reg
        )
        self.steps_applied_total = Counter(
            "sl_steps_applied_total", "Training steps whose gradient was applied.", registry=reg
        )
        self.retries_total = Counter(
            "sl_retries_total",
            "Requests re-sent after a timeout or a retryable error.",
            registry=reg,
        )
        self.checkpoints_total = Counter(
            "sl_checkpoints_total", "Checkpoints written successfully.", registry=reg
        )
        self.last_step_timestamp_seconds = Gauge(
            "sl_last_step_timestamp_seconds",
            "Unix time of the last applied training step; 0 before the first.",
            registry=reg,
        )

    def _init_label_sets(self) -> None:
        """Create every bounded label combination at 0, so series exist from the start."""
        for direction in DIRECTIONS:
            for kind in MESSAGE_KINDS:
                self.messages_total.labels(direction=direction, kind=kind)
                self.bytes_total.labels(direction=direction, kind=kind)
        for reason in REJECT_REASONS:
            self.rejected_messages_total.labels(reason=reason)
        for result in HANDSHAKE_RESULTS:
            self.handshakes_total.labels(result=result)
        for table in BOUNDED_TABLES:
            self.bound_hits_total.labels(table=table)
        # "No value yet" is NaN, not 0: a loss, an accuracy or a dCor of 0 would be a claim.
        # The privacy gauges appear only once a mechanism reports: an epsilon of 0 for a
        # mechanism that is not running would read as "perfect privacy".
        nan = (self.train_loss, self.test_accuracy, self.dcor_last, self.hijack_score)
        for gauge in (*nan, self.hijack_reference_score):
            gauge.set(math.nan)

    def record_message(self, direction: str, kind: str, nbytes: int) -> None:
        """Count one message of ``nbytes`` bytes; an unknown ``kind`` counts as ``other``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'sent' or 'received', not {direction!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        series = self._message_series.get((direction, kind))
        if series is None:  # label lookups cost more than the increments: once per pair
            bounded = _bounded(kind, MESSAGE_KINDS)
            series = (
                self.messages_total.labels(direction=direction, kind=bounded),
                self.bytes_total.labels(direction=direction, kind=bounded),
            )
            self._message_series[(direction, kind)] = series
        series[0].inc()
        series[1].inc(nbytes)

    def record_rejected(self, reason: str) -> None:
        """Count one dropped message; an unknown ``reason`` counts as ``other``."""
        self.rejected_messages_total.labels(reason=_bounded(reason, REJECT_REASONS)).inc()

    def record_bound(self, table: str) -> None:
        """A bounded table refused or evicted an entry; an unknown ``table`` counts as ``other``."""
        self.bound_hits_total.labels(table=_bounded(table, BOUNDED_TABLES)).inc()

    def record_gate_refusal(self, verdict: str) -> None:
        """A connection the gate refused (``gate.Verdict.reason``, not ``ok``)."""
        tables = {"rate": "gate_tokens", "connections": "connections_per_key"}
        if verdict in tables:
            self.record_bound(tables[verdict])
        self.record_handshake("bad_handshake" if verdict == "replay" else "not_admitted")
        reason = "overloaded" if verdict in tables else "replay"
        self.record_rejected(reason if verdict in (*tables, "replay") else "not_admitted")

    def record_handshake(self, result: str) -> None:
        """Count one handshake; ``result`` must be one of :data:`HANDSHAKE_RESULTS`."""
        if result not in HANDSHAKE_RESULTS:
            raise ValueError(f"unknown handshake result {result!r}; expected {HANDSHAKE_RESULTS}")
        self.handshakes_total.labels(result=result).inc()

    def record_step(self, step: int, now_s: float | None = None) -> None:
        """One training step was applied: bump the counter, the gauge and the timestamp."""
        self.steps_applied_total.inc()
        self.step.set(step)
        self.last_step_timestamp_seconds.set(time.time() if now_s is None else now_s)

    def hash_names(self, secret: bytes) -> None:
        """Run ids and client names show as keyed hashes (``[ops] label_names``)."""
        self.names.hash_with(secret)

    def name_legend(self) -> dict[str, str]:
        """Each hashed label value now on /metrics -> the name it stands for."""
        clients = self.clients.names if self.clients is not None else []
        return self.names.legend([*self.runs.names, *clients])

    def set_privacy(self, mechanism: str, epsilon: float, budget: float | None = None) -> None:
        """Report ``epsilon`` spent by ``mechanism`` and its budget (``None``: no budget)."""
        if mechanism not in PRIVACY_MECHANISMS:
            raise ValueError(
                f"unknown privacy mechanism {mechanism!r}; expected {PRIVACY_MECHANISMS}"
            )
        self.privacy_epsilon.labels(mechanism=mechanism).set(epsilon)
        self.privacy_epsilon_budget.labels(mechanism=mechanism).set(budget or 0.0)

    def track_privacy(
        self, mechanism: str, epsilon: Callable[[], float], budget: float | None = None
    ) -> None:
        """Like :meth:`set_privacy`, with ``epsilon`` read at each scrape: for an accountant
        that counts every step (DP-SGD), not only at epoch ends."""
        self.set_privacy(mechanism, 0.0, budget)  # checks the name
        self.privacy_epsilon.labels(mechanism=mechanism).set_function(epsilon)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


__all__ = [
    "BOUNDED_TABLES",
    "DIRECTIONS",
    "HANDSHAKE_RESULTS",
    "LATENCY_BUCKETS_S",
    "MESSAGE_KINDS",
    "PRIVACY_MECHANISMS",
    "REJECT_REASONS",
    "ROLES",
    "WorkerMetrics",
]
