"""A malicious server, and the client-side detector that catches it.

* :func:`fsha_game` plays the feature-space hijacking attack of Pasquini et al. 2021 (FSHA)
  against a client segment: the server trains a pilot encoder and a decoder on public data,
  and a discriminator that tells the client's activations from the pilot's; instead of the
  task gradient it returns the gradient that makes the client's activations look like the
  pilot's, so the client's segment slides into a space the server can decode.
* :class:`GradientScrutinizer` is the client's defence, after Fu et al. 2023 ("Gradients
  Scrutinizer"): an honest server's cut gradients depend on the labels (same-label examples get
  similar gradients, different labels dissimilar ones); a hijacking server's do not. Each batch
  scores ``mean cos(same label) - mean cos(different label)``; a window of low scores flags.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from privacy.audit import mlp_decoder
from privacy.reconstruction import baselines, image_scores
from sl_pipeline.errors import PrivacyError


class GradientScrutinizer:
    """Flags a server whose cut gradients stop depending on the labels.

    After ``warmup`` batches, the detector flags once the mean score of the last ``window``
    batches falls below ``threshold``. Batches with one label only are skipped.
    """

    def __init__(self, threshold: float = 0.1, window: int = 5, warmup: int = 5) -> None:
        if window < 1 or warmup < 0:
            raise PrivacyError("GradientScrutinizer needs window >= 1 and warmup >= 0")
        self.threshold = threshold
        self.window = window
        self.warmup = warmup
        self.scores: deque[float] = deque(maxlen=window)
        self.batches = 0
        self.flagged_at: int | None = None
        self.last_score = float("nan")

    @property
    def flagged(self) -> bool:
        return self.flagged_at is not None

    def observe(self, grads: Tensor, labels: Tensor) -> float:
        """Score one batch's gradients; returns the score (NaN for a one-label batch)."""
        flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
        y = labels.reshape(-1)
        unit = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12)
        cos = unit @ unit.T
        same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
        differ = y[:, None] != y[None, :]
        self.batches += 1
        if not bool(same.any()) or not bool(differ.any()):
            return float("nan")
        score = float(cos[same].mean() - cos[differ].mean())
        self.last_score = score
        self.scores.append(score)
        full = len(self.scores) == self.window and self.batches > self.warmup
        if self.flagged_at is None and full and sum(self.scores) / self.window < self.threshold:
            self.flagged_at = self.batches
        return score


FSHA_STEPS = 2000  # the attack's length in client steps (44 epochs of digits at batch 32)
HIJACK_SCALE = 0.01  # the server's factor on its hijacking gradient (see FSHASetup.scale)
GP_WEIGHT = 10.0  # WGAN-GP's gradient penalty, as in Pasquini et al. 2021


@dataclass(frozen=True)
class FSHASetup:
    """What the game needs: the client's segment (fresh, from ``client``), its data, the
    server's public data, and how long and how fast the client trains.

    ``steps`` is the attack's length; the detector is judged on the first ``epoch_batches``
    of them (one epoch of the client's data). ``scale`` multiplies the gradient the server
    returns: the client applies it with its own optimizer (plain SGD with momentum here),
    and a critic's raw gradient makes that optimizer throw the segment's ReLUs dead (at scale
    1 the inversion collapsed, as the earlier version of this game did); a malicious server
    tunes it."""

    client: Callable[[], nn.Module]
    private_x: Tensor
    private_y: Tensor
    public_x: Tensor
    steps: int
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    scale: float = HIJACK_SCALE


def _critic(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256), nn.LeakyReLU(0.2),
        nn.Linear(256, 1),
    )  # fmt: skip


def _fresh(module: nn.Module) -> nn.Module:
    """The pilot: the client's architecture (which the server knows), new weights."""
    for part in module.modules():
        reset = getattr(part, "reset_parameters", None)
        if callable(reset):
            reset()
    return module


class _Server:
    """FSHA's server side: pilot encoder and decoder (an autoencoder on public data), and a
    WGAN-GP critic telling the client's activations (fake) from the pilot's (real)."""

    def __init__(self, pilot: nn.Module, width: int, out: int, scale: float) -> None:
        self.pilot, self.decoder, self.critic = pilot, mlp_decoder(width, out, 256), _critic(width)
        self.scale = scale
        params = [*pilot.parameters(), *self.decoder.parameters()]
        self.opt_ae = torch.optim.Adam(params, lr=1e-3)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def hijack(self, cut: Tensor, public: Tensor) -> Tensor:
        """One server step on a batch of the client's activations: the gradient it returns."""
        self.opt_ae.zero_grad()
        latent = self.pilot(public).flatten(1)
        nn.functional.mse_loss(self.decoder(latent), public.flatten(1)).backward()
        self.opt_ae.step()
        real, fake = latent.detach(), cut.detach().flatten(1)
        self.opt_critic.zero_grad()
        mix = torch.rand(real.shape[0], 1)
        between = (mix * real + (1 - mix) * fake).requires_grad_(True)
        slope = torch.autograd.grad(self.critic(between).sum(), between, create_graph=True)[0]
        penalty = (torch.linalg.vector_norm(slope, dim=1) - 1).square().mean()
        wasserstein = self.critic(fake).mean() - self.critic(real).mean()
        (wasserstein + GP_WEIGHT * penalty).backward()
        self.opt_critic.step()
        flat = cut.detach().flatten(1).requires_grad_(True)
        grad = torch.autograd.grad(-self.critic(flat).mean(), flat)[0]
        return (self.scale * grad).view_as(cut)

    def invert(self, acts: Tensor) -> Tensor:
        with torch.no_grad():
            return self.decoder(acts.flatten(1))


def fsha_game(
    setup: FSHASetup, *, seed: int = 0, detector: GradientScrutinizer | None = None
) -> dict[str, Any]:
    """Run FSHA (Pasquini et al. 2021) for ``setup.steps`` client steps; report how well the
    server inverts the client's private rows at the end (beside the nearest public row) and
    when ``detector`` flagged."""
    detector = detector or GradientScrutinizer()
    x, y, pub = setup.private_x, setup.private_y, setup.public_x
    with torch.random.fork_rng(devices=[]):
        client, pilot = setup.client(), setup.client()  # a builder may seed the global RNG
        torch.manual_seed(seed)
        server = _Server(
            _fresh(pilot), client(x[:2]).flatten(1).shape[1], x[0].numel(), setup.scale
        )
        opt_c = torch.optim.SGD(client.parameters(), lr=setup.lr, momentum=setup.momentum)
        for _ in range(setup.steps):
            idx = torch.randint(0, x.shape[0], (setup.batch_size,))
            act = client(x[idx])
            pidx = torch.randint(0, pub.shape[0], (setup.batch_size,))
            grad = server.hijack(act.detach(), pub[pidx])  # the server sees only the activations
            detector.observe(grad, y[idx])
            opt_c.zero_grad()
            act.backward(grad)
            opt_c.step()
        guess = server.invert(client(x).detach())
    shape = tuple(x.shape[1:]) if x.dim() == 4 else None
    if shape is not None:
        guess = guess.clamp(0.0, 1.0)  # images: the attacker knows the range
    found = baselines(pub, x, image_shape=shape)["nearest_aux"]
    result = image_scores(guess, x, shape)
    return {
        "fsha_mse": result["mse"],
        "fsha_ssim": result["ssim"],
        "fsha_nearest_public_ssim": found["ssim"],
        "fsha_nearest_public_mse": found["mse"],
        "flagged_at_batch": detector.flagged_at,
        "batches": detector.batches,
    }


__all__ = ["FSHA_STEPS", "HIJACK_SCALE", "FSHASetup", "GradientScrutinizer", "fsha_game"]
