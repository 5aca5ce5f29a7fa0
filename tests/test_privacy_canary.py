"""The canary audit: Clopper-Pearson bounds, the epsilon lower bound, the split game."""

from __future__ import annotations

import math

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
