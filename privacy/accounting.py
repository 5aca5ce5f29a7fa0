"""Privacy accounting only: turns a mechanism's parameters and usage count into epsilon.

No mechanism code lives here (clipping and noise are in :mod:`privacy.defenses`, DP-SGD in
:mod:`privacy.dpsgd`). Every accountant names the mechanism it accounts for, and the two
mechanisms we run are never reported as one another:

* **Gaussian activation release** — the client releases each example's clipped activation
  (L2 norm <= clip) plus N(0, (sigma*clip)^2 I). Per released example this is the Gaussian
  mechanism. Its L2 sensitivity depends on the neighbouring relation:

  - ``adjacency="replace"`` (one record swapped for another, the default): two clipped
    activations differ by up to ``2*clip``, so the noise multiplier is ``sigma / 2``;
  - ``adjacency="add_remove"`` (a record present vs. replaced by the zero activation, the
    relation Opacus uses for DP-SGD): sensitivity ``clip``, noise multiplier ``sigma``.

  Releases compose over steps with an Opacus accountant chosen by name (``rdp``, ``gdp``,
  ``prv``). One *step* is one round in which each record is released with probability
  ``sample_rate``. Subsampling amplification (``sample_rate < 1``) is only valid when batches
  are Poisson-sampled **and the receiver cannot tell which records a batch holds**; in split
  learning the server usually can (it needs the batch's labels or aligned sample ids), so the
  honest default is ``sample_rate = 1`` with one step per epoch (each record released once
  per epoch; disjoint batches compose in parallel). Evaluation passes over training records
  are releases too and must be stepped.

* **Laplace activation release** — L1 clipping and Laplace(b = sigma*clip) noise: pure
  epsilon per release of ``sensitivity / b`` (sensitivity ``2*clip`` for replace, ``clip`` for
  add/remove), composed by *basic* composition (epsilon adds up, delta = 0). Loose, but
  provable; no subsampling amplification is claimed.

* **DP-SGD** on the client segment's weights: read from the Opacus ``PrivacyEngine`` that ran
  it (:class:`DPSGDAccountantView`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from opacus.accountants import IAccountant, create_accountant

from privacy.config import ACCOUNTANTS, NoiseConfig
from sl_pipeline.errors import PrivacyError

ADJACENCIES = ("replace", "add_remove")


# Opacus's RDP accountant warns when its smallest order (1.1) gives the smallest epsilon. The
# figure stays a valid upper bound; a tighter one could only sit at orders below 1.1, where
# noise this small protects nothing anyway. In a worker's log the warning was a raw library
# line (its newlines shown as \n) no user could act on.
SMALLEST_ORDER_WARNING = "Optimal order is the smallest alpha"


def quiet_epsilon(compute: Callable[[], float]) -> float:
    """``compute()`` (an Opacus epsilon) without the smallest-order warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", SMALLEST_ORDER_WARNING, UserWarning)
        return float(compute())


class Accountant(Protocol):
    mechanism_name: str
    metric_label: str  # the ``mechanism`` label of the sl_privacy_epsilon gauge

    def epsilon(self) -> float: ...


def _check_common(sigma: float, sample_rate: float, delta: float, adjacency: str) -> None:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise PrivacyError(f"sigma = {sigma!r} is out of range; allowed: [0, inf)")
    if not (0.0 < sample_rate <= 1.0):
        raise PrivacyError(
            f"sample_rate = {sample_rate!r} is out of range; allowed: (0, 1]",
            hint="use 1.0 unless batches are Poisson-sampled and anonymous",
        )
    if not (0.0 <= delta < 1.0):
        raise PrivacyError(f"delta = {delta!r} is out of range; allowed: [0, 1)")
    if adjacency not in ADJACENCIES:
        raise PrivacyError(
            f"adjacency = {adjacency!r} is not supported; allowed: {', '.join(ADJACENCIES)}"
        )


def _sensitivity_factor(adjacency: str) -> float:
    """Sensitivity in units of ``clip``."""
    return 2.0 if adjacency == "replace" else 1.0


class ActivationReleaseAccountant:
    """(epsilon, delta) of the Gaussian activation release, composed with an Opacus accountant."""

    mechanism_name = "gaussian activation release"
    metric_label = "activation_noise"

    def __init__(
        self,
        sigma: float,
        sample_rate: float,
        delta: float,
        accountant: str = "rdp",
        *,
        adjacency: str = "replace",
    ) -> None:
        _check_common(sigma, sample_rate, delta, adjacency)
        if delta <= 0.0:
            raise PrivacyError(
                "delta = 0 is out of range for the Gaussian mechanism; allowed: (0, 1)",
                hint="use e.g. delta = 1e-5",
            )
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(
                f"accountant = {accountant!r} is not supported; allowed: {', '.join(ACCOUNTANTS)}"
            )
        self.sigma = sigma
        self.sample_rate = sample_rate
        self.delta = delta
        self.adjacency = adjacency
        self.accountant_name = accountant
        self.steps = 0
        self._accountant: IAccountant = create_accountant(accountant)

    @property
    def noise_multiplier(self) -> float:
        """Noise std divided by the L2 sensitivity under the chosen adjacency."""
        return self.sigma / _sensitivity_factor(self.adjacency)

    def step(self, num_steps: int = 1) -> None:
        """Record ``num_steps`` release rounds (one round: each record released w.p. q)."""
        if num_steps < 0:
            raise PrivacyError(f"num_steps = {num_steps} is out of range; allowed: >= 0")
        if self.sigma == 0.0:
            self.steps += num_steps
            return
        for _ in range(num_steps):
            self._accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )
        self.steps += num_steps

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta``; ``inf`` if sigma = 0 and anything was released."""
        if self.steps == 0:
            return 0.0
        if self.sigma == 0.0:
            return math.inf
        return quiet_epsilon(lambda: self._accountant.get_epsilon(delta=self.delta))

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism_name,
            "accountant": self.accountant_name,
            "adjacency": self.adjacency,
            "sigma": self.sigma,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "epsilon": self.epsilon(),
            "delta": self.delta,
        }


class LaplaceReleaseAccountant:
    """Pure epsilon of the Laplace activation release under basic composition."""

    mechanism_name = "laplace activation release (basic composition)"
    metric_label = "activation_noise"

    def __init__(self, sigma: float, *, adjacency: str = "replace") -> None:
        _check_common(sigma, 1.0, 0.0, adjacency)
        self.sigma = sigma
        self.adjacency = adjacency
        self.releases = 0

    @property
    def epsilon_per_release(self) -> float:
        """sensitivity / b = (factor * clip) / (sigma * clip)."""
        return math.inf if self.sigma == 0 else _sensitivity_factor(self.adjacency) / self.sigma

    def step(self, num_releases: int = 1) -> None:
        """Record ``num_releases`` releases of each record (e.g. one per epoch)."""
        if num_releases < 0:
            raise PrivacyError(f"num_releases = {num_releases} is out of range; allowed: >= 0")
        self.releases += num_releases

    def epsilon(self) -> float:
        return 0.0 if self.releases == 0 else self.epsilon_per_release * self.releases

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism_name,
            "adjacency": self.adjacency,
            "sigma": self.sigma,
            "releases": self.releases,
            "epsilon": self.epsilon(),
            "delta": 0.0,
        }


def activation_accountant(
    cfg: NoiseConfig,
    *,
    sample_rate: float = 1.0,
    delta: float = 1e-5,
    accountant: str = "rdp",
    adjacency: str = "replace",
) -> ActivationReleaseAccountant | LaplaceReleaseAccountant:
    """The accountant matching ``cfg.mechanism``."""
    if cfg.mechanism == "laplace":
        return LaplaceReleaseAccountant(cfg.sigma, adjacency=adjacency)
    return ActivationReleaseAccountant(
        cfg.sigma, sample_rate, delta, accountant, adjacency=adjacency
    )


def activation_release_statement(
    cfg: NoiseConfig, releases: int, *, delta: float = 1e-5, adjacency: str = "replace"
) -> dict[str, Any]:
    """What activation noise proves for one record, **for a fixed encoder**.

    ``releases`` is the largest number of times any one record's activation was released over
    the run: once per training epoch for a training row, once per evaluation pass for a test
    row (the two sets are disjoint, so the worst record is the larger count). Returns the
    epsilon of a single release and the epsilon of ``releases`` releases composed.

    Both treat the client segment as a fixed function. It is not: it trains, without DP, on
    the same records, so a record also reaches the server through the encoder that shapes
    every other record's activations. Neither figure bounds that channel.
    """
    if releases < 0:
        raise PrivacyError(f"releases = {releases} is out of range; allowed: >= 0")
    one = activation_accountant(cfg, delta=delta, adjacency=adjacency)
    one.step(1)
    every = activation_accountant(cfg, delta=delta, adjacency=adjacency)
    every.step(releases)
    return {
        "activation_epsilon_per_release": one.epsilon(),
        "activation_releases": releases,
        "activation_epsilon": every.epsilon(),
        "activation_delta": 0.0 if cfg.mechanism == "laplace" else delta,
    }


def linked_dpsgd_epsilon(
    noise_multiplier: float, participations: int, delta: float, accountant: str = "rdp"
) -> float:
    """DP-SGD's epsilon for one row against a party that knows **which steps it took part
    in**: ``participations`` Gaussian mechanisms at ``noise_multiplier``, composed with no
    subsampling amplification (conditioned on the sampling, which does not depend on the
    data, each step the row is in is a Gaussian mechanism on it; the others do not touch it).

    Opacus' figure amplifies by the sample rate, which holds only while the observer cannot
    tell which rows a batch holds. A server that sees the activations can: it links a row's
    releases by their nearest neighbour (``python -m workers.tools.audit_link``).
    """
    if participations < 0:
        raise PrivacyError(f"participations = {participations} is out of range; allowed: >= 0")
    if not (0.0 < delta < 1.0):
        raise PrivacyError(f"delta = {delta!r} is out of range; allowed: (0, 1)")
    if participations == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    counted = create_accountant(accountant)
    for _ in range(participations):
        counted.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return quiet_epsilon(lambda: counted.get_epsilon(delta=delta))


class DPSGDAccountantView:
    """Reads DP-SGD's epsilon from the accountant of an Opacus ``PrivacyEngine``."""

    metric_label = "dpsgd"

    def __init__(self, engine: Any, delta: float) -> None:
        if not (0.0 < delta < 1.0):
            raise PrivacyError(f"delta = {delta!r} is out of range; allowed: (0, 1)")
        self.engine = engine
        self.delta = delta

    @property
    def mechanism_name(self) -> str:
        return f"DP-SGD on client weights (opacus {self.engine.accountant.mechanism()})"

    def epsilon(self) -> float:
        if len(self.engine.accountant) == 0:
            return 0.0
        return quiet_epsilon(lambda: self.engine.get_epsilon(self.delta))

    def describe(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism_name, "epsilon": self.epsilon(), "delta": self.delta}


__all__ = [
    "ADJACENCIES",
    "Accountant",
    "ActivationReleaseAccountant",
    "DPSGDAccountantView",
    "LaplaceReleaseAccountant",
    "activation_accountant",
    "activation_release_statement",
    "linked_dpsgd_epsilon",
]
