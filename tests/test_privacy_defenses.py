"""Cut-layer defenses: clipping properties, noise scale, identity when off, gradient flow."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.config import NoiseConfig, NoPeekConfig, PrivacyConfig
from privacy.defenses import (
    ActivationNoise,
    Compose,
    CutLayerDefense,
    Identity,
    build_defenses,
    clip_per_sample,
)
from sl_pipeline.errors import PrivacyError


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 8),
    d=st.integers(1, 12),
    clip=st.floats(0.01, 10.0),
    spread=st.floats(0.001, 100.0),
    seed=st.integers(0, 2**31 - 1),
    order=st.sampled_from([1, 2]),
)
def test_clipping_bounds_norms_and_keeps_small_samples(
    n: int, d: int, clip: float, spread: float, seed: int, order: int
) -> None:
    # Prepare
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, d, generator=g, dtype=torch.float64) * spread
    # Execute
    y = clip_per_sample(x, clip, norm=order)
    # Assert
    before = torch.linalg.vector_norm(x.flatten(1), ord=order, dim=1)
    after = torch.linalg.vector_norm(y.flatten(1), ord=order, dim=1)
    assert bool((after <= clip + 1e-5).all())
    inside = before <= clip
    assert torch.equal(y[inside], x[inside])
    # Clipping only rescales: directions are kept.
    cos = torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones_like(cos))


def test_clipping_handles_zero_samples() -> None:
    x = torch.zeros(3, 4)
    assert torch.equal(clip_per_sample(x, 1.0), x)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noise_changes_output_with_expected_std(mechanism: str) -> None:
    # Prepare: activations inside the clip bound, so only the noise changes them.
    defense = ActivationNoise(
        sigma=0.5, clip=2.0, mechanism=mechanism, generator=torch.Generator().manual_seed(0)
    )
    x = torch.full((400, 50), 1e-3)
    # Execute
    noise = defense.apply(x) - x
    # Assert: Gaussian std = sigma*clip; Laplace(b) has std b*sqrt(2).
    expected = 1.0 if mechanism == "gaussian" else 2**0.5
    assert not torch.equal(noise, torch.zeros_like(noise))
    assert abs(float(noise.std()) - expected) / expected < 0.03
    assert abs(float(noise.mean())) < 0.05


def test_laplace_clips_l1_norm() -> None:
    defense = ActivationNoise(sigma=0.0, clip=1.0, mechanism="laplace")
    y = defense.apply(torch.ones(2, 10))
    assert torch.allclose(y.abs().sum(dim=1), torch.ones(2))


def test_gradient_flows_through_noise_and_clipping() -> None:
    # Prepare
    layer = torch.nn.Linear(4, 6)
    defense = ActivationNoise(sigma=1.0, clip=0.1, generator=torch.Generator().manual_seed(1))
    # Execute
    out = defense.apply(layer(torch.randn(5, 4)))
    out.backward(torch.ones_like(out))
    # Assert
    assert layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()
    assert float(layer.weight.grad.abs().sum()) > 0


def test_identity_when_nothing_is_on() -> None:
    x = torch.randn(3, 4)
    defense = build_defenses(PrivacyConfig(nopeek=NoPeekConfig(alpha=1.0)))
    assert isinstance(defense, Identity)
    assert defense.apply(x) is x


def test_build_defenses_changes_what_is_sent() -> None:
    # Prepare
    cfg = PrivacyConfig(noise=NoiseConfig(sigma=0.3, clip=1.0))
    x = torch.randn(8, 16) * 5
    # Execute
    defense = build_defenses(cfg, generator=torch.Generator().manual_seed(0))
    # Assert
    assert isinstance(defense, CutLayerDefense)
    y = defense.apply(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)


def test_compose_applies_in_order_and_validates() -> None:
    clip = ActivationNoise(sigma=0.0, clip=1.0)
    both = Compose([clip, ActivationNoise(sigma=0.0, clip=0.5)])
    y = both.apply(torch.full((2, 4), 3.0))
    assert torch.allclose(torch.linalg.vector_norm(y, dim=1), torch.full((2,), 0.5))
    with pytest.raises(PrivacyError, match=r"defenses\[1\]"):
        Compose([clip, object()])  # type: ignore[list-item]


@pytest.mark.parametrize(("sigma", "clip"), [(-1.0, 1.0), (1.0, 0.0), (float("inf"), 1.0)])
def test_bad_parameters_refused_at_construction(sigma: float, clip: float) -> None:
    with pytest.raises(PrivacyError, match="allowed"):
        ActivationNoise(sigma=sigma, clip=clip)
