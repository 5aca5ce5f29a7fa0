"""Label protection for the cut gradients the label holder sends to a non-label party.

In the vertical topology a party without labels receives, for every example, the gradient of
the loss with respect to its own activations. Li et al. 2022 ("Label Leakage and Protection in
Two-party Split Learning") show that for binary labels these gradients leak the label through
their norm (the minority class has larger gradients) and their direction (the two classes
point in opposite directions). Both protections here run on the label holder, before sending.

Neither gives a differential-privacy guarantee; their effect is measured empirically with
:func:`privacy.audit.label_leak_auc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from privacy.config import LabelConfig
from privacy.randomness import SecretRandomness, keyed_normal
from sl_pipeline.errors import PrivacyError

_TINY = 1e-12
_SPLIT_GRID = 201


class LabelProtection(Protocol):
    """Perturbs per-example gradients ``(batch, ...)`` given the batch's labels."""

    def protect(self, grads: Tensor, labels: Tensor) -> Tensor: ...


class NoLabelProtection:
    def protect(self, grads: Tensor, labels: Tensor) -> Tensor:
        return grads


def _flat(grads: Tensor) -> Tensor:
    if grads.dim() < 2:
        raise PrivacyError(
            f"grads must be (batch, ...) with at least 2 dims, got shape {tuple(grads.shape)}",
            hint="pass per-example gradients with the batch dimension first",
        )
    return grads.reshape(grads.shape[0], -1)


class GaussianGradientNoise(SecretRandomness):
    """Isotropic Gaussian noise calibrated to the batch's gradient norms.

    Every coordinate gets ``N(0, s^2)`` with ``s = scale * median_i ||g_i|| / sqrt(d)``, so the
    noise vector's expected squared norm is ``(scale * median norm)^2``: ``scale`` is the
    noise-to-signal norm ratio. Labels are not used. In high dimension isotropic noise barely
    moves the *ranking* of gradient norms, so this needs a large ``scale`` against the norm
    attack; :class:`Marvell` spends the same power far more effectively.
    """

    def __init__(self, scale: float, generator: torch.Generator | None = None) -> None:
        self.scale = LabelConfig(mechanism="gaussian", scale=scale).scale
        self.generator = generator

    def protect(self, grads: Tensor, labels: Tensor) -> Tensor:
        flat = _flat(grads)
        if flat.shape[0] == 0:
            return grads
        median = torch.linalg.vector_norm(flat, dim=1).median()
        std = self.scale * median / flat.shape[1] ** 0.5
        if self.generator is not None:  # an audit's: the draws its figures were measured on
            noise = self.normal(flat.shape, flat.dtype, flat.device)
        else:  # keyed to each row's exact gradient: a redone step is released again as it was
            noise = keyed_normal(self.key, flat).to(dtype=flat.dtype, device=flat.device)
        return (flat + std * noise).reshape(grads.shape)


@dataclass(frozen=True)
class MarvellPlan:
    """Per-class noise for one batch: a full-covariance part plus a rank-one part along ``u``.

    Class ``c`` examples get ``factor[c] @ z + sqrt(dir_var[c]) * xi * u`` with
    ``z ~ N(0, I_d)``, ``xi ~ N(0, 1)``, so the first part's covariance is
    ``factor[c] @ factor[c].T`` (:attr:`noise_cov`). ``power`` is the expected noise power
    averaged over the batch's class mix; it never exceeds
    ``budget = scale * ||mean_1 - mean_0||^2``.
    """

    factor: Tensor  # (2, d, d)
    dir_var: Tensor  # (2,)
    direction: Tensor  # (d,) unit vector along mean_1 - mean_0
    power: float
    budget: float

    @property
    def noise_cov(self) -> Tensor:
        """(2, d, d): each class's covariance from the full-covariance part."""
        return self.factor @ self.factor.transpose(1, 2)


def _check_binary(labels: Tensor, n: int) -> Tensor:
    y = labels.reshape(-1)
    if y.shape[0] != n:
        raise PrivacyError(
            f"labels has {y.shape[0]} entries but grads has {n} examples",
            hint="pass one label per example",
        )
    if not bool(((y == 0) | (y == 1)).all()):
        raise PrivacyError(
            "labels must be binary (0 or 1) for Marvell",
            hint="map the positive class to 1 and the rest to 0",
        )
    return y.bool()


def _sym_kl(d2: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """KL(N(0,a)||N(d,b)) + KL(N(d,b)||N(0,a)) for 1-D Gaussians (elementwise in a, b)."""
    return 0.5 * (a / b + b / a - 2.0) + 0.5 * d2 * (1.0 / a + 1.0 / b)


def _covariance_gap(groups: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Square-root factors ``(2, d, d)`` of the noise that gives both classes one covariance,
    and each factor's power ``(2,)``.

    With ``S_1 - S_0 = V diag(l) V^T``, class 0 gets ``V diag(max(l, 0)) V^T`` and class 1
    ``V diag(max(-l, 0)) V^T``: both then have covariance ``S_0 + (S_1 - S_0)_+``, in every
    direction, not only per coordinate. A diagonal match (the earlier plan) left the class with
    small rank-one gradients with isotropic noise, whose energy off the main direction gave its
    label away (red team 16).
    """
    covs = []
    for g in groups:
        centred = g - g.mean(dim=0)
        covs.append(centred.T @ centred / g.shape[0])
    gap = covs[1] - covs[0]
    eigval, eigvec = torch.linalg.eigh(0.5 * (gap + gap.T))
    lifts = (eigval.clamp_min(0.0), (-eigval).clamp_min(0.0))
    factor = torch.stack([eigvec * lift.sqrt() for lift in lifts])
    return factor, torch.stack([lift.sum() for lift in lifts])


def marvell_plan(grads: Tensor, labels: Tensor, scale: float) -> MarvellPlan | None:
    """Choose the per-class noise for one batch; ``None`` if a class is absent.

    1. Estimate each class's mean and covariance matrix.
    2. Second moments: give each class the extra covariance that lifts both to one common
       covariance (:func:`_covariance_gap`; scaled down if the budget is too small).
    3. First moments: spend the remaining budget along ``u = (mean_1 - mean_0)/||...||``,
       splitting it between the classes to minimise the symmetrised KL divergence of the two
       classes' projections on ``u`` (the quantity Marvell's AUC bound is built on).
    """
    flat = _flat(grads).detach().to(torch.float64)
    pos = _check_binary(labels, flat.shape[0])
    n1 = int(pos.sum())
    n0 = flat.shape[0] - n1
    if n0 == 0 or n1 == 0:
        return None
    groups = (flat[~pos], flat[pos])
    delta = groups[1].mean(dim=0) - groups[0].mean(dim=0)
    d2 = float(delta.square().sum())
    budget = scale * d2
    weights = torch.tensor([n0, n1], dtype=torch.float64) / flat.shape[0]
    factor, lift_power = _covariance_gap(groups)
    eq_cost = float((weights * lift_power).sum())
    if eq_cost > budget:
        factor = factor * (budget / eq_cost) ** 0.5
        eq_cost = budget
    rest = max(budget - eq_cost, 0.0)
    u = delta / max(d2**0.5, _TINY)
    noise_along = (factor.transpose(1, 2) @ u).square().sum(dim=1)
    own_along = torch.stack([(g @ u).var(unbiased=False) for g in groups])
    base = (own_along + noise_along).clamp_min(_TINY)  # class variance along u
    t = torch.linspace(0.0, 1.0, _SPLIT_GRID, dtype=torch.float64)
    lam0, lam1 = t * rest / weights[0], (1.0 - t) * rest / weights[1]
    best = int(torch.argmin(_sym_kl(torch.tensor(d2), base[0] + lam0, base[1] + lam1)))
    dir_var = torch.stack([lam0[best], lam1[best]])
    power = eq_cost + float((weights * dir_var).sum())
    return MarvellPlan(factor=factor, dir_var=dir_var, direction=u, power=power, budget=budget)


class Marvell(SecretRandomness):
    """Class-dependent Gaussian noise in the spirit of Marvell (Li et al. 2022), binary labels.

    The paper solves, per batch, for two noise covariances (one per class) minimising an upper
    bound on the best attacker's AUC (via the symmetrised KL divergence between the two
    classes' perturbed gradient distributions), subject to the power constraint
    ``(1-p) tr(S_0) + p tr(S_1) <= P`` with ``P = scale * ||mean_1 - mean_0||^2``.

    This version keeps the paper's power constraint and objective but restricts the search to a
    simple family (see :func:`marvell_plan`): noise that gives both classes one covariance
    matrix (not only equal per-coordinate variances), plus noise along the mean-difference
    direction split between classes by a 1-D grid search on the symmetrised KL. It does not
    solve the paper's full optimisation (the common covariance is one upper bound of the two,
    not the cheapest for the AUC bound), and it treats each batch on its own (the last
    batch's plan is reused when a batch holds one class only; before any two-class batch,
    isotropic noise of power ``scale * median ||g||^2`` is used instead). Noise is zero-mean,
    so it cannot move the class means: with ``scale = s`` the projected classes differ by
    ``||mean_1 - mean_0||`` against a noise std of about ``sqrt(s) * ||mean_1 - mean_0||``.
    """

    def __init__(self, scale: float, generator: torch.Generator | None = None) -> None:
        self.scale = LabelConfig(mechanism="marvell", scale=scale).scale
        self.generator = generator
        self.last_plan: MarvellPlan | None = None

    def protect(self, grads: Tensor, labels: Tensor) -> Tensor:
        flat = _flat(grads)
        plan = marvell_plan(grads, labels, self.scale) or self.last_plan
        if plan is None:
            fallback = GaussianGradientNoise(self.scale**0.5, self.generator)
            fallback._key = self.key
            return fallback.protect(grads, labels)
        self.last_plan = plan
        pos = _check_binary(labels, flat.shape[0]).long()
        if self.generator is not None:  # an audit's: the draws its figures were measured on
            z = self.normal(flat.shape, torch.float64, flat.device)
            xi = self.normal(torch.Size((flat.shape[0], 1)), torch.float64, flat.device)
        else:  # keyed to each row's exact gradient (as GaussianGradientNoise's)
            drawn = keyed_normal(self.key, flat, flat.shape[1] + 1).to(flat.device)
            z, xi = drawn[:, :-1], drawn[:, -1:]
        factor = plan.factor.to(flat.device)[pos]  # (batch, d, d)
        dir_std = plan.dir_var.to(flat.device).sqrt()[pos].unsqueeze(1)
        noise = (factor @ z.unsqueeze(2)).squeeze(2) + dir_std * xi * plan.direction.to(flat.device)
        return (flat + noise.to(flat.dtype)).reshape(grads.shape)


def build_label_protection(
    cfg: LabelConfig | None, *, generator: torch.Generator | None = None
) -> LabelProtection:
    """The label holder's protection for ``cfg``; a no-op when off."""
    if cfg is None or cfg.mechanism == "none":
        return NoLabelProtection()
    if cfg.mechanism == "gaussian":
        return GaussianGradientNoise(cfg.scale, generator)
    return Marvell(cfg.scale, generator)


__all__ = [
    "GaussianGradientNoise",
    "LabelProtection",
    "Marvell",
    "MarvellPlan",
    "NoLabelProtection",
    "build_label_protection",
    "marvell_plan",
]
