"""What the listener reports about connections it refused or closed: metrics and log lines.

The gate's refusals (a stranger, a replayed or stale connection token) and the ZMTP codec's
(a frame, message or handshake over its cap, a broken protocol; see ``sl_pipeline.zmtp``)
each count in ``sl_rejected_messages_total``; the log says each once per source and
interval (:class:`QuietLog`), since a peer can cause them at will.
"""

from __future__ import annotations

from workers.ops.metrics import WorkerMetrics
from workers.runtime.quietlog import QuietLog


class EdgeReports:
    def __init__(self, metrics: WorkerMetrics, quiet: QuietLog) -> None:
        self.metrics = metrics
        self.quiet = quiet

    def gated(self, verdict: str, address: str) -> None:
        """A connection the gate refused, before it could send anything (see gate.py)."""
        if verdict == "ok":
            return
        self.metrics.record_gate_refusal(verdict)
        line = "refused a connection from %s before any message (%s)"
        self.quiet.warning(f"gate {address}", line, address, verdict)

    def dropped(self, reason: str, address: str, detail: str) -> None:
        """A connection the listener closed: a cap or the protocol broken (a refused
        message), too much waiting to go out to it (a bound hit), or silence."""
        if reason == "outbound":
            self.metrics.record_bound("outbound_bytes")
        elif reason == "backlog":
            self.metrics.record_bound("inbound_backlog")
        elif reason == "pending":  # too many connections in the ZMTP handshake
            self.metrics.record_bound("pending_handshakes")
        elif reason in ("oversized", "malformed"):
            self.metrics.record_rejected(reason)
        line = "closed the connection from %s (%s): %s"
        self.quiet.warning(f"drop {address} {reason}", line, address, reason, detail)
