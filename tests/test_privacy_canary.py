"""The canary audit: Clopper-Pearson bounds, the epsilon lower bound, the split game."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from privacy.accounting import ActivationReleaseAccountant
from privacy.canary import CanaryGame, clopper_pearson_upper, epsilon_lower_bound, run_canary_game
from privacy.config import DPSGDConfig
from sl_pipeline.errors import PrivacyError


def test_clopper_pearson_matches_closed_forms() -> None:
    # k = 0: the bound solves (1 - p)^n = alpha; k = n: the bound is 1.
    assert clopper_pearson_upper(0, 20, 0.05) == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-9)
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0
    assert 0.5 < clopper_pearson_upper(10, 20, 0.05) < 0.75


def test_lower_bound_never_exceeds_a_gaussian_mechanisms_true_epsilon() -> None:
    # Prepare: scores of a Gaussian mechanism (sensitivity 1, std sigma): the optimal test.
    sigma, n, delta = 0.5, 2000, 1e-5
    g = torch.Generator().manual_seed(0)
    inside = (1.0 + sigma * torch.randn(n, generator=g)).tolist()
    outside = (sigma * torch.randn(n, generator=g)).tolist()
    true = ActivationReleaseAccountant(2 * sigma, 1.0, delta)  # replace: multiplier sigma
    true.step(1)
    # Execute
    found = epsilon_lower_bound(inside, outside, delta=delta)
    # Assert
    assert 0.5 < found["epsilon_lower_bound"] <= true.epsilon()
    assert found["runs"] == 2 * n


def test_identical_scores_give_no_evidence() -> None:
    scores = [float(i % 7) for i in range(40)]
    assert epsilon_lower_bound(scores, list(scores))["epsilon_lower_bound"] == 0.0
    with pytest.raises(PrivacyError, match="at least 4 runs"):
        epsilon_lower_bound([1.0, 2.0], [0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("epsilon", [0.0, 0.5])
def test_lower_bound_keeps_its_confidence_over_many_synthetic_audits(epsilon: float) -> None:
    # Prepare: 300 audits of 40 runs a side whose scores come from a mechanism of known
    # epsilon (delta 0): randomised response, each run's bit kept w.p. e^eps / (1 + e^eps), the
    # mechanism whose every test sits on the DP boundary; at eps 0 both sides are one Gaussian
    g, audits, exceeded = torch.Generator().manual_seed(7), 300, 0
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    for _ in range(audits):
        if epsilon == 0.0:
            inside, outside = torch.randn(40, generator=g), torch.randn(40, generator=g)
        else:
            inside = (torch.rand(40, generator=g) < keep).double()
            outside = (torch.rand(40, generator=g) >= keep).double()
        # Execute
        found = epsilon_lower_bound(inside.tolist(), outside.tolist(), delta=0.0)
        exceeded += found["epsilon_lower_bound"] > epsilon
    # Assert: a 95 % lower bound is above the true epsilon in at most 5 % of audits (point
    # estimates of the rates instead of Clopper-Pearson bounds: about half of them)
    assert exceeded <= 0.05 * audits


def test_separated_scores_show_the_most_the_runs_allow() -> None:
    # 40 runs a side, 20 of each measured: no error still leaves FPR, FNR <= 1 - 0.025^(1/20)
    found = epsilon_lower_bound([1.0] * 40, [0.0] * 40)
    most = 1 - 0.025 ** (1 / 20)
    assert found["epsilon_lower_bound"] == pytest.approx(math.log((1 - 1e-5 - most) / most))
    assert found["epsilon_lower_bound"] == pytest.approx(1.60, abs=0.005)  # docs/privacy.md
    assert found["false_positive_rate"] == found["false_negative_rate"] == 0.0


def game(train_server: bool) -> CanaryGame:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()

    def segments() -> tuple[nn.Module, nn.Module]:
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 2)

    return CanaryGame(
        segments=segments,
        x=x,
        y=y,
        canary_x=torch.full((1, 6), 4.0),
        canary_y=torch.tensor([0]),  # x[0] > 0 says 1: mislabelled
        dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        epochs=1,
        batch_size=16,
        lr=0.1,
        train_server=train_server,
    )


@pytest.mark.filterwarnings("ignore")
def test_canary_game_is_seeded_and_reports_the_accountant() -> None:
    # Execute
    first = run_canary_game(game(True), 4, seed=1)
    again = run_canary_game(game(True), 4, seed=1)
    # Assert
    assert first == again
    assert first["runs"] == 8 and first["server_trained"] is True
    assert math.isfinite(first["accountant_epsilon"]) and first["accountant_epsilon"] > 0
    assert first["epsilon_lower_bound"] >= 0.0


@pytest.mark.filterwarnings("ignore")
def test_runs_with_and_without_the_canary_are_one_mechanism() -> None:
    # Prepare: 64 rows in batches of 16; with the canary 65, which Opacus alone samples at
    # 1/5 over 5 steps an epoch, not the 1/4 over 4 of the runs without it
    counted = ActivationReleaseAccountant(1.0, 0.25, 1e-5, adjacency="add_remove")
    counted.step(4)  # the Poisson-sampled Gaussian of DP-SGD: sigma 1, q 1/4, 4 steps
    # Execute
    result = run_canary_game(game(False), 4, seed=0)
    # Assert: every run sampled each row at 1/4 for 4 steps; the accountant's figure is that
    # mechanism's, fixed here so that a change in what is counted shows
    assert result["accountant_sample_rate"] == 0.25 and result["accountant_steps"] == 4
    assert result["accountant_epsilon"] == pytest.approx(4.870641742929558, rel=1e-9)
    assert result["accountant_epsilon"] == pytest.approx(counted.epsilon(), rel=1e-9)


def test_canary_game_refuses_fixed_batches() -> None:
    fixed = replace(game(True), dpsgd=DPSGDConfig(noise_multiplier=1.0, poisson_sampling=False))
    with pytest.raises(PrivacyError, match="poisson_sampling = true"):
        run_canary_game(fixed, 4)
