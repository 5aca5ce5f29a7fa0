"""How many times the most-released training row's activation has gone to the server: the
count the activation-noise accountant composes (each release is one noised mechanism, and
the server sees which rows a batch holds, so no subsampling amplification applies).

With fixed batches every row goes once per epoch, so the count is the epochs trained. With
DP-SGD's Poisson batches a row goes in any number of an epoch's batches (7 times in 2 epochs
for one breast_cancer row), so the rows handed out are counted one by one and the largest
count is the figure; counting one per epoch there undercounted the epsilon (16.51 reported
where the wire held 37.93, docs/privacy.md). A checkpoint keeps the figure, not the rows:
after a resume the rows are counted afresh on top of it, which can only overcount.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from privacy.config import NoiseConfig


class Releases:
    """The worst row's release count so far (``total``)."""

    def __init__(self, per_row: bool) -> None:
        self.per_row = per_row  # Poisson batches: count each row handed out
        self.before = 0  # the count a checkpoint held, when this process resumed from it
        self.epochs = 0  # epochs ended in this process
        self.counts: Counter[int] = Counter()
        self.most = 0  # the largest of ``counts``

    def handed_out(self, ids: torch.Tensor) -> None:
        """The rows of a batch about to be sent (a resent batch counts again)."""
        if not self.per_row:
            return
        for row in ids.reshape(-1).tolist():
            self.counts[row] += 1
            self.most = max(self.most, self.counts[row])

    def epoch_ended(self) -> None:
        self.epochs += 1

    @property
    def total(self) -> int:
        return self.before + (self.most if self.per_row else self.epochs)

    def state(self) -> dict[str, Any]:
        return {"activation_releases": self.total}

    def restore(self, state: dict[str, Any]) -> None:
        """From a checkpoint; one written before the count existed held the epochs."""
        self.before = int(state.get("activation_releases", state.get("accounted_epochs", 0)))
        self.epochs, self.most = 0, 0
        self.counts.clear()


class ActivationAccounting:
    """Activation noise's accountant (None without noise) fed the worst row's releases."""

    def __init__(self, noise: NoiseConfig | None, per_row: bool) -> None:
        self.accountant: Any = None
        if noise is not None and noise.sigma > 0:
            from privacy.accounting import activation_accountant

            self.accountant = activation_accountant(noise, sample_rate=1.0)
        self.releases = Releases(per_row)
        self.composed = 0  # the releases the accountant has composed

    def handed_out(self, ids: torch.Tensor) -> None:
        self.releases.handed_out(ids)

    def epoch_ended(self) -> float | None:
        """The epsilon so far, once the epoch's releases are composed (None without noise)."""
        self.releases.epoch_ended()
        return self.epsilon()

    def epsilon(self) -> float | None:
        due = self.releases.total - self.composed
        if self.accountant is None:
            return None
        if due > 0:
            self.accountant.step(due)
            self.composed += due
        return float(self.accountant.epsilon())

    def state(self) -> dict[str, Any]:
        return self.releases.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.releases.restore(state)
        self.epsilon()

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
