"""UnSplit: inversion from the architecture alone, no auxiliary data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privacy.unsplit import total_variation, unsplit_audit
from sl_pipeline.errors import PrivacyError


def segment() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def digits(n: int = 16) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)


def test_total_variation_of_constant_and_checkerboard() -> None:
    assert float(total_variation(torch.ones(1, 1, 4, 4))) == 0.0
    board = (torch.arange(16).reshape(4, 4) + torch.arange(4)[:, None]) % 2
    assert float(total_variation(board.float().reshape(1, 1, 4, 4))) == pytest.approx(2.0)


def test_unsplit_beats_the_grey_image_without_any_data() -> None:
    # Prepare: the victim's segment, whose weights the attacker never sees.
    torch.manual_seed(3)
    victim = segment()
    x = digits()
    with torch.no_grad():
        z = victim(x)
    # Execute
    found = unsplit_audit(segment, x, z, seed=0, rounds=10, inner_steps=20)
    again = unsplit_audit(segment, x, z, seed=0, rounds=10, inner_steps=20)
    # Assert
    assert found == again
    assert found["unsplit_mse"] < 0.8 * found["baseline_grey_mse"]
    assert found["unsplit_ssim"] > found["baseline_grey_ssim"] + 0.04  # 0.070 against 0.006
    with pytest.raises(PrivacyError):
        unsplit_audit(segment, x, z, rounds=0)
