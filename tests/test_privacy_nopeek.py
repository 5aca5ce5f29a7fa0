"""Distance correlation against an independent numpy double-loop reference (Székely 2007)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.nopeek import NoPeekLoss, distance_correlation
from sl_pipeline.errors import PrivacyError


def reference_dcor(x: np.ndarray, z: np.ndarray) -> float:
    """Plain loops straight from the definition: a_kl, double centring, V-statistics."""
    n = x.shape[0]

    def centred(v: np.ndarray) -> list[list[float]]:
        d = [
            [math.sqrt(sum((v[k][i] - v[m][i]) ** 2 for i in range(v.shape[1]))) for m in range(n)]
            for k in range(n)
        ]
        row = [sum(d[k]) / n for k in range(n)]
        col = [sum(d[k][m] for k in range(n)) / n for m in range(n)]
        tot = sum(row) / n
        return [[d[k][m] - row[k] - col[m] + tot for m in range(n)] for k in range(n)]

    a, b = centred(x.reshape(n, -1)), centred(z.reshape(n, -1))
    cov = sum(a[k][m] * b[k][m] for k in range(n) for m in range(n)) / n**2
    vx = sum(a[k][m] ** 2 for k in range(n) for m in range(n)) / n**2
    vz = sum(b[k][m] ** 2 for k in range(n) for m in range(n)) / n**2
    if vx * vz <= 0:
        return 0.0
    return math.sqrt(max(cov, 0.0) / math.sqrt(vx * vz))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 12),
    dx=st.integers(1, 4),
    dz=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    coupling=st.floats(0.0, 3.0),
)
def test_matches_reference(n: int, dx: int, dz: int, seed: int, coupling: float) -> None:
    # Prepare: z partly depends on x so the cases span weak to strong dependence.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx))
    z = rng.normal(size=(n, dz)) + coupling * np.tanh(x[:, :1])
    # Execute
    ours = float(distance_correlation(torch.from_numpy(x), torch.from_numpy(z)))
    # Assert
    assert ours == pytest.approx(reference_dcor(x, z), abs=1e-5)


def test_identical_and_affine_images_give_one() -> None:
    x = torch.randn(30, 5, dtype=torch.float64)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(distance_correlation(x, -2.5 * x + 7.0)) == pytest.approx(1.0, abs=1e-6)


def test_independent_large_samples_near_zero() -> None:
    # The V-statistic is biased upwards by O(n^-1/2) under independence: ~0.3 at n=100.
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2000, 3, generator=g), torch.randn(2000, 3, generator=g)
    assert float(distance_correlation(x, z)) < 0.1


def test_zero_variance_returns_zero_with_finite_gradient() -> None:
    x = torch.ones(10, 3, requires_grad=True)
    z = torch.randn(10, 2, requires_grad=True)
    out = distance_correlation(x, z)
    out.backward()
    assert float(out.detach()) == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40))
def test_in_unit_interval(seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    value = float(
        distance_correlation(torch.randn(n, 4, generator=g), torch.randn(n, 2, 2, generator=g) ** 3)
    )
    assert 0.0 <= value <= 1.0


def test_gradient_flows_to_activations_and_lowers_dcor() -> None:
    # Prepare: a layer whose output strongly depends on its input.
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    layer = torch.nn.Linear(8, 4)
    loss_fn = NoPeekLoss(alpha=1.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    start = float(loss_fn(x, layer(x)).detach())
    # Execute: a few steps minimising only the NoPeek term.
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(x, layer(x))
        loss.backward()
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        opt.step()
    # Assert
    assert float(loss_fn(x, layer(x)).detach()) < start


def test_nopeek_scales_by_alpha_and_validates() -> None:
    x, z = torch.randn(16, 3), torch.randn(16, 3)
    assert float(NoPeekLoss(2.0)(x, z)) == pytest.approx(2 * float(distance_correlation(x, z)))
    with pytest.raises(PrivacyError, match=r"privacy\.nopeek\.alpha"):
        NoPeekLoss(-1.0)
    with pytest.raises(PrivacyError, match="samples"):
        distance_correlation(torch.randn(3, 2), torch.randn(4, 2))
