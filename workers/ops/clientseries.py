"""Per-client series a server exports, so a client is visible after its process ended.

A client's own ``/metrics`` disappears when it finishes (it exits); the server outlives it.
So the server keeps, per client name: whether it is connected, whether it finished its
part of its latest run (a completed state the alert rules respect: finished is not down),
its steps and last step time in that run, its epoch, and the test accuracy it reported on
leaving. Names are bounded: :data:`MAX_CLIENTS` keep their series (the oldest goes; for a
relay's client, the oldest of that relay's clients).
"""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Gauge

from workers.ops.labels import NameLabels

MAX_CLIENTS = 256


class ClientSeries:
    def __init__(self, registry: CollectorRegistry, label: NameLabels | None = None) -> None:
        self.label = label or NameLabels()  # a client's name -> its label value

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, ["client"], registry=registry)

        self.connected = gauge("sl_client_connected", "Server: 1 while the client is joined.")
        self.finished = gauge(
            "sl_client_finished",
            "Server: 1 once the client finished its part of its latest run, 0 while it trains.",
        )
        self.steps = gauge("sl_client_steps", "Server: steps applied for the client in its run.")
        self.last_step = gauge(
            "sl_client_last_step_timestamp_seconds",
            "Server: Unix time of the client's last applied step.",
        )
        self.epoch = gauge("sl_client_epoch", "Server: the client's epoch (1-based).")
        self.accuracy = gauge(
            "sl_client_test_accuracy_ratio",
            "Server: the test accuracy the client reported when it finished.",
        )
        self._all = (
            self.connected,
            self.finished,
            self.steps,
            self.last_step,
            self.epoch,
            self.accuracy,
        )
        self._names: list[str] = []
        # client -> its steps, epoch and last-step series: every applied step sets them
        self._stepping: dict[str, tuple[Gauge, Gauge, Gauge]] = {}

    @property
    def names(self) -> list[str]:
        """The clients whose series are exported."""
        return list(self._names)

    def _touch(self, client: str) -> None:
        if self._names and self._names[-1] == client:
            return  # already the newest name: nothing moves, nothing is evicted
        if client in self._names:
            self._names.remove(client)
        self._names.append(client)
        if len(self._names) > MAX_CLIENTS:
            old = self._oldest_of(client)
            self._names.remove(old)
            self._stepping.pop(old, None)
            for series in self._all:
                if self.label(old) in {s[0] for s in series._metrics}:
                    series.remove(self.label(old))

    def _oldest_of(self, client: str) -> str:
        """Whose series go for newcomer ``client``: the oldest of its own relay's other
        clients (``relay-1/...``: a relay names them, so its churn of names pushes out its
        own, never another project's clients), else the oldest name."""
        relay, _, behind = client.partition("/")
        mine = (n for n in self._names if behind and n.startswith(f"{relay}/") and n != client)
        return next(mine, self._names[0])

    def joined(self, client: str, training: bool = True) -> None:
        """A peer joined. One that only infers (``predict``, a client past its epochs) trains
        nothing: whether it finished stays as it was, so its leaving is no lost client."""
        self._touch(client)
        self.connected.labels(self.label(client)).set(1)
        if training:
            self.finished.labels(self.label(client)).set(0)

    def left(self, client: str) -> None:
        """The client left; a relay leaving takes its clients (``relay-1/client-1``) along:
        the server hears of them only through it."""
        for name in self._names:
            if name == client or name.startswith(f"{client}/"):
                self.connected.labels(self.label(name)).set(0)

    def started(self, client: str, connected: bool = False) -> None:
        """The client trains in a new run: its counts start again, and the accuracy it
        reported for its previous run is no figure of this one. ``connected``: its first step
        shows it there (a relay's client, whose hello the server never sees)."""
        self._touch(client)
        if connected:
            self.connected.labels(self.label(client)).set(1)
        self.finished.labels(self.label(client)).set(0)
        self.steps.labels(self.label(client)).set(0)
        self.accuracy.labels(self.label(client)).set(math.nan)

    def stepped(self, client: str, steps: int, epoch: int) -> None:
        self._touch(client)
        series = self._stepping.get(client)
        if series is None:
            series = self._stepping[client] = (
                self.steps.labels(self.label(client)),
                self.epoch.labels(self.label(client)),
                self.last_step.labels(self.label(client)),
            )
        series[0].set(steps)
        series[1].set(epoch + 1)
        series[2].set(time.time())

    def restored(self, client: str, steps: int, epoch: int | None, finished: bool) -> None:
        """A member of an active run, as a restarted server's checkpoint knows it: not joined
        yet (one that never comes back is a lost client, ``SLClientLost``; the series were
        absent until its next step, so nothing could fire), its steps counted on."""
        self._touch(client)
        self.connected.labels(self.label(client)).set(0)
        self.finished.labels(self.label(client)).set(int(finished))
        self.steps.labels(self.label(client)).set(steps)
        if epoch is not None:
            self.epoch.labels(self.label(client)).set(epoch + 1)

    def part_over(self, client: str) -> None:
        """Its run was stopped (``runs stop``, or it gave its place up) before it finished:
        nothing is left for it to do there, so it is not lost (``SLClientLost`` fired on
        for a stopped run until that name joined again)."""
        self._touch(client)
        self.finished.labels(self.label(client)).set(1)

    def done(self, client: str, accuracy: float | None) -> None:
        self._touch(client)
        self.finished.labels(self.label(client)).set(1)
        if accuracy is not None:
            self.accuracy.labels(self.label(client)).set(accuracy)
