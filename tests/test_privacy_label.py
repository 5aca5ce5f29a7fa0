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
    assert bool((torch.linalg.eigvalsh(plan.noise_cov) > -1e-9).all())
    assert bool((plan.dir_var >= 0).all())


def _class_covariances(grads: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    flat = grads.double()
    out = []
    for c in (0, 1):
        centred = flat[y == c] - flat[y == c].mean(0)
        out.append(centred.T @ centred / centred.shape[0])
    return out


def test_marvell_equalises_full_covariance_when_budget_allows() -> None:
    # Prepare: the red team's case. Class 1 (minority): large gradients along one direction;
    # class 0 (majority): small gradients along the same direction plus a little spread, and
    # correlated coordinates, so that matching the diagonals alone leaves the matrices apart.
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(300) % 3 == 0).long()
    v = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    size = torch.where(y == 1, 3.0, 0.3) * (1 + 0.5 * torch.randn(300, generator=g))
    grads = size[:, None] * v + 0.05 * torch.randn(300, 6, generator=g)
    grads[y == 1] -= 0.8 * v
    cov0, cov1 = _class_covariances(grads, y)
    assert float((cov1 - cov0).norm()) > 0.5 * float(cov1.norm())  # far apart before
    # Execute
    plan = marvell_plan(grads, y, scale=1000.0)
    # Assert: the whole second-moment matrices after noise match, off-diagonal terms included.
    assert plan is not None
    after0, after1 = cov0 + plan.noise_cov[0], cov1 + plan.noise_cov[1]
    assert torch.allclose(after0, after1, atol=1e-9)
    # Sampled noise realises it: off the direction u, the output's class covariances agree.
    ys, many = torch.cat([y] * 40), torch.cat([grads] * 40)
    noisy = Marvell(1000.0, generator=torch.Generator().manual_seed(2)).protect(many, ys).double()
    off = noisy - (noisy @ plan.direction)[:, None] * plan.direction  # u carries the mean gap
    emp0, emp1 = _class_covariances(off, ys)
    assert float((emp0 - emp1).norm()) < 0.1 * float(emp1.norm())


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


@pytest.mark.parametrize("mechanism", ["marvell", "gaussian"])
def test_a_redone_step_is_protected_as_it_was_and_its_noise_keeps_its_power(
    mechanism: str,
) -> None:
    # Prepare: the OS-keyed noise a live u-shaped client uses (no generator); a server that
    # rewinds the client gets each step's gradients again: with fresh draws, 16 redos
    # averaged left a quarter of the noise's std
    grads, y = binary_logit_grads()
    protection = build_label_protection(LabelConfig(mechanism=mechanism, scale=4.0))
    clean = protection.protect(grads, y) - grads  # noise power of one release
    # Execute
    redone = [protection.protect(grads, y) for _ in range(16)]
    # Assert: every redo is the first release, bit for bit, so their mean keeps all the noise
    assert all(torch.equal(r, redone[0]) for r in redone)
    kept = float((torch.stack(redone).mean(0) - grads).flatten(1).square().sum(1).mean())
    assert kept == pytest.approx(float(clean.flatten(1).square().sum(1).mean()), rel=1e-5)
    # ... and other gradients draw independent noise (the next epoch's)
    moved = grads + 1e-4
    again = (protection.protect(moved, y) - moved).flatten()
    assert abs(float(torch.corrcoef(torch.stack([clean.flatten(), again]))[0, 1])) < 0.1
    if mechanism == "gaussian":  # the calibrated power of the seeded draws, from keyed ones
        median = float(grads.flatten(1).norm(dim=1).median())
        power = float(clean.flatten(1).square().sum(1).mean())
        assert power == pytest.approx((4.0 * median) ** 2, rel=0.05)
