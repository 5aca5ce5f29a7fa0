"""A server's series per training run, keyed by a ``run`` label: the :data:`RUN_SERIES` most
recent runs keep theirs (bounded over months of runs)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge

from workers.ops.labels import RUN_SERIES, NameLabels


class RunSeries:
    def __init__(self, registry: CollectorRegistry, label: NameLabels | None = None) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, ["run"], registry=registry)

        self.label = label or NameLabels()  # a run's id -> its label value
        self.steps = gauge("sl_run_steps", "Server: training steps applied in each recent run.")
        self.active = gauge(
            "sl_run_active",
            "Server: 1 while a recent run trains, 0 once it finished or was stopped.",
        )
        self.train_loss = gauge(
            "sl_run_train_loss",
            "Server: the last training loss of each recent run (NaN before its first step).",
        )
        self.test_accuracy = gauge(
            "sl_run_test_accuracy_ratio",
            "Server: a recent run's test accuracy, the mean its clients reported on finishing "
            "(NaN until one did).",
        )
        self._runs: dict[str, tuple[Gauge, ...]] = {}  # run -> its series (labels looked up once)
        self._ended: set[str] = set()  # runs of _runs that ended: their series go first

    @property
    def names(self) -> list[str]:
        """The runs whose series are exported."""
        return list(self._runs)

    def record(
        self,
        run: str,
        steps: int,
        active: bool,
        loss: float | None = None,
        accuracy: float | None = None,
    ) -> None:
        """A run's progress; :data:`RUN_SERIES` runs keep their series, the oldest ended
        run's going first (else the oldest run's): another group's churn of short runs
        cannot take an active run's series away."""
        series = self._runs.get(run)
        if series is None:  # every step of a server reports its run: label lookups once
            per_run = (self.steps, self.active, self.train_loss, self.test_accuracy)
            series = self._runs[run] = tuple(gauge.labels(self.label(run)) for gauge in per_run)
            ended = [r for r in self._runs if r in self._ended]
            gone = (ended + [r for r in self._runs if r not in self._ended])[:-RUN_SERIES]
            for old in gone:
                del self._runs[old]
                self._ended.discard(old)
                for gauge in per_run:
                    gauge.remove(self.label(old))
        if active:
            self._ended.discard(run)
        else:
            self._ended.add(run)
        steps_gauge, active_gauge, loss_gauge, accuracy_gauge = series
        steps_gauge.set(steps)
        active_gauge.set(1 if active else 0)
        loss_gauge.set(math.nan if loss is None else loss)
        accuracy_gauge.set(math.nan if accuracy is None else accuracy)


__all__ = ["RunSeries"]
