"""Accounting: fixed expected epsilons, equality with Opacus' own accountants, monotonicity."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import (
    ActivationReleaseAccountant,
    LaplaceReleaseAccountant,
    activation_accountant,
)
from privacy.config import NoiseConfig
from sl_pipeline.errors import PrivacyError


def opacus_rdp_epsilon(noise_multiplier: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize(
    ("adjacency", "expected", "multiplier"),
    [("add_remove", 2.101, 1.0), ("replace", 15.464, 0.5)],
)
def test_rdp_fixed_epsilon_and_opacus_wiring(
    adjacency: str, expected: float, multiplier: float
) -> None:
    # Prepare
    acc = ActivationReleaseAccountant(sigma=1.0, sample_rate=0.01, delta=1e-5, adjacency=adjacency)
    # Execute
    acc.step(1000)
    # Assert: the hard-coded value, and Opacus' RDPAccountant at the derived noise multiplier.
    assert round(acc.epsilon(), 3) == expected
    assert acc.epsilon() == opacus_rdp_epsilon(multiplier, 0.01, 1000, 1e-5)
    assert acc.mechanism_name == "gaussian activation release"
    assert acc.metric_label == "activation_noise"
    assert "DP-SGD" not in acc.describe()["mechanism"]


def test_no_amplification_fixed_epsilon() -> None:
    # sample_rate = 1, one step per epoch: sigma = 2, 10 epochs, replace adjacency.
    acc = ActivationReleaseAccountant(sigma=2.0, sample_rate=1.0, delta=1e-5)
    acc.step(10)
    assert round(acc.epsilon(), 3) == 19.054


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize(("name", "expected"), [("prv", 1.838), ("gdp", 1.618)])
def test_other_accountants_chosen_by_name(name: str, expected: float) -> None:
    acc = ActivationReleaseAccountant(1.0, 0.01, 1e-5, name, adjacency="add_remove")
    acc.step(1000)
    assert round(acc.epsilon(), 3) == expected


@pytest.mark.parametrize("q", [0.05, 1.0])
def test_epsilon_monotone_in_steps_and_sigma(q: float) -> None:
    def eps(sigma: float, steps: int) -> float:
        acc = ActivationReleaseAccountant(sigma, q, 1e-5)
        acc.step(steps)
        return acc.epsilon()

    by_steps = [eps(1.0, n) for n in (1, 5, 20, 80)]
    by_sigma = [eps(s, 20) for s in (0.8, 1.6, 3.2)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == len(by_steps)
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == len(by_sigma)


def test_zero_noise_is_infinite_and_nothing_released_is_zero() -> None:
    acc = ActivationReleaseAccountant(0.0, 1.0, 1e-5)
    assert acc.epsilon() == 0.0
    acc.step()
    assert math.isinf(acc.epsilon())


def test_laplace_basic_composition() -> None:
    # Prepare: b = sigma * clip, L1 sensitivity 2 * clip (replace) -> eps = 2 / sigma per release.
    acc = activation_accountant(NoiseConfig(sigma=4.0, clip=1.0, mechanism="laplace"))
    assert isinstance(acc, LaplaceReleaseAccountant)
    # Execute
    acc.step(3)
    # Assert
    assert acc.epsilon() == pytest.approx(1.5)
    assert LaplaceReleaseAccountant(4.0, adjacency="add_remove").epsilon_per_release == 0.25
    assert "basic composition" in acc.mechanism_name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sigma": -1.0, "sample_rate": 0.1, "delta": 1e-5},
        {"sigma": 1.0, "sample_rate": 0.0, "delta": 1e-5},
        {"sigma": 1.0, "sample_rate": 0.1, "delta": 0.0},
        {"sigma": 1.0, "sample_rate": 0.1, "delta": 1e-5, "accountant": "moments"},
        {"sigma": 1.0, "sample_rate": 0.1, "delta": 1e-5, "adjacency": "swap"},
    ],
)
def test_bad_accountant_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(PrivacyError, match="allowed"):
        ActivationReleaseAccountant(**kwargs)  # type: ignore[arg-type]


def test_release_statement_composes_every_release_of_the_worst_record() -> None:
    # Prepare: sigma 2 (replace: multiplier 1), 10 releases: the documented 19.054.
    from privacy.accounting import activation_release_statement
    from privacy.config import NoiseConfig

    # Execute
    statement = activation_release_statement(NoiseConfig(sigma=2.0), 10)
    one = activation_release_statement(NoiseConfig(sigma=2.0), 1)
    # Assert
    assert statement["activation_epsilon"] == pytest.approx(19.054, abs=1e-3)
    assert statement["activation_releases"] == 10
    assert statement["activation_epsilon_per_release"] == one["activation_epsilon"]
    assert one["activation_epsilon"] < statement["activation_epsilon"]
    laplace = activation_release_statement(NoiseConfig(sigma=4.0, mechanism="laplace"), 3)
    assert laplace["activation_epsilon"] == pytest.approx(1.5) and laplace["activation_delta"] == 0


def test_a_small_sigma_gives_its_bound_without_opacus_smallest_order_warning() -> None:
    # sigma 0.1 for 8 epochs: Opacus's RDP accountant warned "Optimal order is the smallest
    # alpha ..." into the worker's log, a raw library line (a journey review)
    import warnings

    accountant = ActivationReleaseAccountant(sigma=0.1, sample_rate=1.0, delta=1e-5)
    accountant.step(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epsilon = accountant.epsilon()
    assert math.isfinite(epsilon) and epsilon > 100  # a valid, and useless, bound
    assert not [w for w in caught if "smallest alpha" in str(w.message)], caught
