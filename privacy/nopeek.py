"""NoPeek: penalise the distance correlation between raw inputs and cut-layer activations.

Vepakomma et al. 2020 ("NoPEEK: Information leakage reduction to share activations in
distributed deep learning") add ``alpha * dCor(X, Z)`` to the client loss so the activations
``Z`` carry less of the inputs' structure. This is an empirical defense: it lowers measured
leakage (see :func:`privacy.audit.dcor_leakage`) but gives no formal guarantee.
"""

from __future__ import annotations

import torch
from torch import Tensor

from privacy.config import NoPeekConfig
from sl_pipeline.errors import PrivacyError

_EPS = 1e-12


def _centred_distances(x: Tensor) -> Tensor:
    """Double-centred pairwise Euclidean distance matrix of the flattened samples."""
    flat = x.reshape(x.shape[0], -1)
    d = torch.cdist(flat, flat, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """Sample distance correlation of Székely et al. (2007) between ``x`` and ``z``.

    Both are ``(n, ...)`` with matching ``n``; each sample is flattened. Uses the V-statistic
    ``dCov^2 = mean(A * B)`` of the double-centred distance matrices, and returns
    ``sqrt(dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z)))`` in [0, 1], or 0 when either side has
    zero variance. Differentiable in both arguments (and finite-gradient at the zero cases).
    """
    if x.shape[0] != z.shape[0]:
        raise PrivacyError(
            f"distance_correlation: x has {x.shape[0]} samples but z has {z.shape[0]}",
            hint="pass the inputs and activations of the same batch",
        )
    if x.shape[0] < 2:
        return x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    dtype = torch.promote_types(torch.promote_types(x.dtype, z.dtype), torch.float32)
    a = _centred_distances(x.to(dtype))
    b = _centred_distances(z.to(dtype))
    dcov2 = (a * b).mean().clamp_min(0.0)
    dvar2 = (a * a).mean() * (b * b).mean()
    ok = dvar2 > _EPS**2
    denom = torch.sqrt(torch.where(ok, dvar2, torch.ones_like(dvar2)))
    ratio = torch.where(ok, dcov2 / denom, torch.zeros_like(dcov2))
    positive = ratio > 0
    root = torch.sqrt(torch.where(positive, ratio, torch.ones_like(ratio)))
    return torch.where(positive, root, torch.zeros_like(root)).clamp(max=1.0)


class NoPeekLoss:
    """``alpha * dCor(inputs, activations)``, to be added to the client's training loss."""

    def __init__(self, alpha: float) -> None:
        self.alpha = NoPeekConfig(alpha=alpha).alpha

    def __call__(self, inputs: Tensor, activations: Tensor) -> Tensor:
        return self.alpha * distance_correlation(inputs, activations)

    def __repr__(self) -> str:
        return f"NoPeekLoss(alpha={self.alpha})"


__all__ = ["NoPeekLoss", "distance_correlation"]
