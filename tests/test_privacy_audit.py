"""Audits: SSIM known values, reconstruction attack, dCor leakage, label-attack inputs."""

from __future__ import annotations

import pytest
import torch

from privacy.audit import dcor_leakage, label_leak_auc, reconstruction_attack, ssim
from privacy.defenses import ActivationNoise
from sl_pipeline.errors import PrivacyError


def images(n: int = 4, seed: int = 0, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g)


def test_ssim_of_identical_images_is_one() -> None:
    x = images()
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_ssim_of_constant_images_matches_formula() -> None:
    # Constant images: variances are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.6, 0.01**2
    x, y = torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b)
    assert float(ssim(x, y)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_decreases_with_noise() -> None:
    x = images()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [float(ssim(x, (x + s * noise).clamp(0, 1))) for s in (0.0, 0.05, 0.2, 0.5)]
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] < 0.6


def test_ssim_rejects_mismatched_shapes() -> None:
    with pytest.raises(PrivacyError, match=r"\(N, C, H, W\)"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 7))


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """8x8 images driven by 6 latent factors: 'data of the same kind' for aux and victim."""
    basis = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return torch.sigmoid(latent @ basis).reshape(n, 1, 8, 8)


def test_reconstruction_attack_succeeds_without_defense_and_noise_hurts_it() -> None:
    # Prepare: a linear 'client segment'; the attacker queries it on its own aux images.
    torch.manual_seed(0)
    segment = torch.nn.Linear(64, 32)
    aux, victim = smooth_images(256, seed=1), smooth_images(64, seed=2)
    with torch.no_grad():
        aux_act, victim_act = segment(aux.flatten(1)), segment(victim.flatten(1))
    noisy = ActivationNoise(sigma=2.0, clip=1.0, generator=torch.Generator().manual_seed(0))
    attack = {"epochs": 10, "seed": 0, "lr": 1e-2, "hidden": 64}
    # Execute
    clean = reconstruction_attack(aux, aux_act, victim, victim_act, **attack)  # type: ignore[arg-type]
    defended = reconstruction_attack(
        aux, noisy.apply(aux_act), victim, noisy.apply(victim_act), **attack
    )  # type: ignore[arg-type]
    # Assert
    baseline = float(victim.var())  # MSE of always guessing the mean
    assert clean["reconstruction_mse"] < 0.5 * baseline
    assert defended["reconstruction_mse"] > baseline
    assert clean["ssim"] > 0.7 > 0.2 > defended["ssim"]


def test_reconstruction_attack_is_seeded_and_leaves_global_rng_alone() -> None:
    x = smooth_images(32, seed=3)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = reconstruction_attack(x, x.flatten(1)[:, :10], x, x.flatten(1)[:, :10], epochs=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert (
        reconstruction_attack(x, x.flatten(1)[:, :10], x, x.flatten(1)[:, :10], epochs=2) == first
    )


def test_reconstruction_attack_without_image_shape_has_no_ssim() -> None:
    x = torch.randn(32, 5)
    out = reconstruction_attack(x, x * 2, x, x * 2, epochs=1, seed=0, hidden=16)
    assert out["ssim"] is None and out["reconstruction_mse"] >= 0


def test_dcor_leakage_separates_dependent_from_independent() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g)
    leaky = dcor_leakage(x, torch.tanh(x @ torch.randn(4, 3, generator=g)), batch_size=200)
    independent = dcor_leakage(x, torch.randn(600, 3, generator=g), batch_size=200)
    assert leaky > 0.7 > 0.25 > independent
    with pytest.raises(PrivacyError, match="batch_size"):
        dcor_leakage(x, x, batch_size=1)


def test_label_leak_auc_is_half_for_uninformative_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 500)
    result = label_leak_auc(torch.randn(1000, 8, generator=g), y)
    assert set(result) == {"norm_auc", "direction_auc", "label_leak_auc"}
    assert 0.5 <= result["label_leak_auc"] < 0.56
    with pytest.raises(PrivacyError, match="both classes"):
        label_leak_auc(torch.randn(4, 2), torch.zeros(4))
