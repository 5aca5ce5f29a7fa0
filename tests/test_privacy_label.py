"""Label leakage on cut gradients: the attacks work on clean gradients, protections blunt them."""

from __future__ import annotations

import pytest
import torch

from privacy.audit import label_leak_auc
from privacy.config import LabelConfig
from privacy.label import (
    GaussianGradientNoise,
    Marvell,
    NoLabelProtection,
    build_label_protection,
    marvell_plan,
)
from sl_pipeline.errors import PrivacyError


def binary_logit_grads(
    n: int = 1000, d: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients shaped like a logistic head's: (p - y) * w + small noise, 20% positives.

    Positives (minority) get |p - 1| ~ 0.6, negatives |p| ~ 0.2: positives have larger norms
    and point the opposite way, the two leaks Li et al. 2022 describe.
    """
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.2).long()
    w = torch.randn(d, generator=g)
    p = torch.where(
        y == 1, 0.3 + 0.2 * torch.rand(n, generator=g), 0.1 + 0.2 * torch.rand(n, generator=g)
    )
    grads = (p - y)[:, None] * w + 0.05 * torch.randn(n, d, generator=g)
    return grads.reshape(n, 4, 4), y


def test_attacks_succeed_on_clean_gradients() -> None:
    grads, y = binary_logit_grads()
    result = label_leak_auc(grads, y)
    assert result["norm_auc"] > 0.9
    assert result["direction_auc"] > 0.9
    assert result["label_leak_auc"] == max(result["norm_auc"], result["direction_auc"])


@pytest.mark.parametrize(("scale", "ceiling"), [(1.0, 0.8), (4.0, 0.7)])
def test_marvell_lowers_leak_auc_and_keeps_shape(scale: float, ceiling: float) -> None:
    # Prepare
    grads, y = binary_logit_grads()
    marvell = Marvell(scale, generator=torch.Generator().manual_seed(1))
    # Execute
    protected = marvell.protect(grads, y)
    # Assert
    assert protected.shape == grads.shape
    assert label_leak_auc(protected, y)["label_leak_auc"] < ceiling


def test_marvell_respects_power_budget() -> None:
    # Prepare
    grads, y = binary_logit_grads(seed=3)
    flat = grads.flatten(1).double()
    gap = float((flat[y == 1].mean(0) - flat[y == 0].mean(0)).square().sum())
    # Execute
    plan = marvell_plan(grads, y, scale=2.0)
    # Assert: planned power never exceeds P = s * ||mean_1 - mean_0||^2 and uses it all.
    assert plan is not None
    assert plan.budget == pytest.approx(2.0 * gap)
    assert plan.power <= plan.budget * (1 + 1e-9)
    assert plan.power == pytest.approx(plan.budget, rel=1e-6)
    assert bool((plan.diag_var >= 0).all()) and bool((plan.dir_var >= 0).all())


def test_marvell_equalises_second_moments_when_budget_allows() -> None:
    # Prepare: classes with equal means but different spreads, and a big budget.
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 200)
    spread = torch.where(y == 1, 3.0, 1.0)[:, None]
    grads = torch.randn(400, 5, generator=g) * spread
    grads[y == 1] += 0.5
    # Execute
    plan = marvell_plan(grads, y, scale=1000.0)
    # Assert: per-coordinate variances after noise match.
    assert plan is not None
    flat = grads.double()
    var0 = flat[y == 0].var(0, unbiased=False) + plan.diag_var[0]
    var1 = flat[y == 1].var(0, unbiased=False) + plan.diag_var[1]
    assert torch.allclose(var0, var1)


def test_marvell_single_class_batch_reuses_last_plan() -> None:
    grads, y = binary_logit_grads(n=200)
    marvell = Marvell(1.0, generator=torch.Generator().manual_seed(0))
    first = marvell.protect(grads[:20, :2], torch.zeros(20, dtype=torch.long))  # no plan yet
    assert marvell.last_plan is None and not torch.equal(first, grads[:20, :2])
    marvell.protect(grads, y)
    plan = marvell.last_plan
    out = marvell.protect(grads[y == 0], y[y == 0])
    assert marvell.last_plan is plan and out.shape == grads[y == 0].shape


def test_gaussian_noise_is_calibrated_to_median_norm() -> None:
    # Prepare
    grads, y = binary_logit_grads(d=16)
    median = float(grads.flatten(1).norm(dim=1).median())
    # Execute
    noise = GaussianGradientNoise(2.0, torch.Generator().manual_seed(0)).protect(grads, y) - grads
    # Assert: E||noise||^2 = (scale * median)^2.
    power = float(noise.flatten(1).square().sum(1).mean())
    assert power == pytest.approx((2.0 * median) ** 2, rel=0.05)


def test_large_gaussian_noise_lowers_leak_but_less_than_marvell() -> None:
    grads, y = binary_logit_grads()
    gaussian = GaussianGradientNoise(4.0, torch.Generator().manual_seed(0)).protect(grads, y)
    marvell = Marvell(4.0, torch.Generator().manual_seed(0)).protect(grads, y)
    assert label_leak_auc(gaussian, y)["norm_auc"] < 0.8
    gaussian_auc = label_leak_auc(gaussian, y)["label_leak_auc"]
    assert label_leak_auc(marvell, y)["label_leak_auc"] < gaussian_auc


def test_builder_and_validation() -> None:
    assert isinstance(build_label_protection(None), NoLabelProtection)
    assert isinstance(build_label_protection(LabelConfig("marvell", 1.0)), Marvell)
    assert isinstance(build_label_protection(LabelConfig("gaussian", 1.0)), GaussianGradientNoise)
    with pytest.raises(PrivacyError, match="binary"):
        Marvell(1.0).protect(torch.randn(4, 2), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(PrivacyError, match=r"privacy\.label\.scale"):
        Marvell(-1.0)
