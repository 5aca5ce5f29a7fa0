"""Cut-layer defenses: small composable transforms the client applies before sending.

A defense is a *mechanism* only: it clips and adds noise, and knows nothing about epsilon.
What the noise buys in (epsilon, delta) is computed in :mod:`privacy.accounting`.

Every defense keeps the autograd graph: clipping is a differentiable rescaling and noise is
additive, so the gradient the server returns still reaches the client's layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from privacy.config import NoiseConfig, PrivacyConfig
from privacy.randomness import SecretRandomness, keyed_exponential, keyed_normal
from sl_pipeline.errors import PrivacyError

_TINY = 1e-12


@runtime_checkable
class CutLayerDefense(Protocol):
    """Transforms a batch of cut-layer activations ``(batch, ...)`` before they are sent."""

    def apply(self, activations: Tensor) -> Tensor: ...


class Identity:
    """The defense used when nothing is on: returns its input unchanged."""

    def apply(self, activations: Tensor) -> Tensor:
        return activations

    def __repr__(self) -> str:
        return "Identity()"


def clip_per_sample(activations: Tensor, clip: float, *, norm: int = 2) -> Tensor:
    """Scale each sample (flattened) so its L``norm`` norm is at most ``clip``.

    Samples already within the bound are returned bit-for-bit unchanged (factor exactly 1).
    """
    if activations.dim() < 1 or activations.shape[0] == 0:
        return activations
    flat = activations.reshape(activations.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, ord=norm, dim=1)
    factor = (clip / norms.clamp_min(_TINY)).clamp(max=1.0)
    shape = (-1,) + (1,) * (activations.dim() - 1)
    return activations * factor.reshape(shape).to(activations.dtype)


class ActivationNoise(SecretRandomness):
    """Per-sample clipping to ``clip`` then additive noise of scale ``sigma * clip``.

    * ``gaussian``: clips the **L2** norm and adds N(0, (sigma*clip)^2) to every coordinate.
    * ``laplace``: clips the **L1** norm (the Laplace mechanism's sensitivity is an L1 bound)
      and adds Laplace noise of scale b = sigma*clip to every coordinate.

    ``sigma = 0`` clips only. ``generator`` makes the noise reproducible for audits and tests;
    leave it ``None`` in production: the noise then comes from the OS cryptographic generator
    (:mod:`privacy.randomness`), never from a torch generator, whose draws a peer can predict,
    and is keyed: a row's noise is a function of a secret key drawn at construction and of the
    row's exact clipped activation, so the same row through the same weights is released bit
    for bit again (a redone step, a repeated prediction) and averaging repeats gains nothing.
    """

    def __init__(
        self,
        sigma: float,
        clip: float,
        mechanism: str = "gaussian",
        generator: torch.Generator | None = None,
    ) -> None:
        cfg = NoiseConfig(sigma=sigma, clip=clip, mechanism=mechanism)  # type: ignore[arg-type]
        self.sigma = cfg.sigma
        self.clip = cfg.clip
        self.mechanism = cfg.mechanism
        self.generator = generator

    @property
    def noise_scale(self) -> float:
        """Gaussian standard deviation, or Laplace scale b, per coordinate."""
        return self.sigma * self.clip

    def apply(self, activations: Tensor) -> Tensor:
        norm = 2 if self.mechanism == "gaussian" else 1
        clipped = clip_per_sample(activations, self.clip, norm=norm)
        if self.sigma == 0.0:
            return clipped
        return clipped + self._noise(clipped)

    def _noise(self, like: Tensor) -> Tensor:
        if self.generator is None:  # production: keyed by the row (privacy.randomness)
            if self.mechanism == "gaussian":
                drawn = keyed_normal(self.key, like)
            else:
                drawn = keyed_exponential(self.key, like, 2)
                drawn = drawn[0] - drawn[1]
            return drawn.to(dtype=like.dtype, device=like.device) * self.noise_scale
        if self.mechanism == "gaussian":
            return self.normal(like.shape, like.dtype, like.device) * self.noise_scale
        # Laplace(0, b) is the difference of two independent Exponential(1/b) variables.
        return (self.exponential(like) - self.exponential(like)) * self.noise_scale

    def __repr__(self) -> str:
        return (
            f"ActivationNoise(sigma={self.sigma}, clip={self.clip}, mechanism={self.mechanism!r})"
        )


class Compose:
    """Applies several defenses in order."""

    def __init__(self, defenses: Sequence[CutLayerDefense]) -> None:
        for i, d in enumerate(defenses):
            if not isinstance(d, CutLayerDefense):
                raise PrivacyError(
                    f"defenses[{i}] = {d!r} has no apply(activations) method",
                    hint="pass objects implementing CutLayerDefense",
                )
        self.defenses = tuple(defenses)

    def apply(self, activations: Tensor) -> Tensor:
        for d in self.defenses:
            activations = d.apply(activations)
        return activations

    def __repr__(self) -> str:
        return f"Compose({list(self.defenses)!r})"


def build_defenses(
    cfg: PrivacyConfig, *, generator: torch.Generator | None = None
) -> CutLayerDefense:
    """The client's cut-layer transform for ``cfg``; :class:`Identity` when nothing is on.

    NoPeek (a loss term), DP-SGD (an optimizer) and label protection (server side) are not
    cut-layer transforms; see :mod:`privacy.nopeek`, :mod:`privacy.dpsgd`, :mod:`privacy.label`.
    """
    defenses: list[CutLayerDefense] = []
    if cfg.noise is not None:
        n = cfg.noise
        defenses.append(ActivationNoise(n.sigma, n.clip, n.mechanism, generator=generator))
    if not defenses:
        return Identity()
    return defenses[0] if len(defenses) == 1 else Compose(defenses)


__all__ = [
    "ActivationNoise",
    "Compose",
    "CutLayerDefense",
    "Identity",
    "build_defenses",
    "clip_per_sample",
]
