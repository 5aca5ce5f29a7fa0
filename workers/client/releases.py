"""How many times the most-released training row's activation has gone to the server: the
count the activation-noise accountant composes (each release is one noised mechanism, and
the server sees which rows a batch holds, so no subsampling amplification applies).

Every row handed out for a step is counted, whatever drew the batch. With fixed batches and
nothing redone that is once per epoch; but DP-SGD's Poisson batches send a row in any number
of an epoch's batches (7 times in 2 epochs for one breast_cancer row), and a step redone
after a rewind or a pipelined resume is recomputed through newer weights, so its rows go out
again with fresh noise (noise is keyed to the activation's bytes: only an identical resend
is no new release). Counting one per epoch undercounted both (16.51 reported where the wire
held 37.93, docs/privacy.md). A checkpoint keeps the figure, not the rows: after a resume the
rows are counted afresh on top of it, which can only overcount.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from privacy.config import NoiseConfig


class Releases:
    """The worst row's release count so far (``total``)."""

    def __init__(self) -> None:
        self.before = 0  # the count a checkpoint held, when this process resumed from it
        self.counts: Counter[int] = Counter()
        self.most = 0  # the largest of ``counts``

    def handed_out(self, ids: torch.Tensor) -> None:
        """The rows of a batch about to be sent (a batch handed out again counts again)."""
        for row in ids.reshape(-1).tolist():
            self.counts[row] += 1
            self.most = max(self.most, self.counts[row])

    @property
    def total(self) -> int:
        return self.before + self.most

    def state(self) -> dict[str, Any]:
        return {"activation_releases": self.total}

    def restore(self, state: Mapping[str, Any]) -> None:
        """From a checkpoint. One written before the count existed held the epochs ended,
        right for fixed batches; with DP-SGD's it undercounts, and its steps done bound the
        count instead (a row is in at most one batch per step)."""
        if "activation_releases" in state:
            before = state["activation_releases"]
        elif state.get("dpsgd"):
            before = state.get("steps_done", 0)
        else:
            before = state.get("accounted_epochs", 0)
        self.before = int(before)
        self.most = 0
        self.counts.clear()


class ActivationAccounting:
    """Activation noise's accountant (None without noise) fed the worst row's releases."""

    def __init__(self, noise: NoiseConfig | None) -> None:
        self.accountant: Any = None
        if noise is not None and noise.sigma > 0:
            from privacy.accounting import activation_accountant

            self.accountant = activation_accountant(noise, sample_rate=1.0)
        self.releases = Releases()
        self.composed = 0  # the releases the accountant has composed

    def track(self, metrics: Any) -> None:
        """The ``activation_noise`` epsilon gauge, read at each scrape (WorkerMetrics)."""
        if self.accountant is not None:
            metrics.track_privacy("activation_noise", lambda: self.epsilon() or 0.0)

    def handed_out(self, ids: torch.Tensor) -> None:
        if self.accountant is not None:  # nothing to count for: no cost per step
            self.releases.handed_out(ids)

    def epsilon(self) -> float | None:
        """The epsilon of the releases so far (None without noise)."""
        if self.accountant is None:
            return None
        due = self.releases.total - self.composed
        if due > 0:
            self.accountant.step(due)
            self.composed += due
        return float(self.accountant.epsilon())

    def state(self) -> dict[str, Any]:
        return self.releases.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.releases.restore(state)

    def report(self) -> dict[str, Any]:
        epsilon = self.epsilon()
        if epsilon is None:
            return {}
        return {
            "activation_releases": self.composed,
            "activation_epsilon": round(epsilon, 4),
            "activation_mechanism": self.accountant.mechanism_name,
        }


__all__ = ["ActivationAccounting", "Releases"]
