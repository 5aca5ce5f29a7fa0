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


@dataclass(frozen=True)
class FSHASetup:
    """What the game needs: the client's segment (fresh, from ``client``), its data, the
    server's public data, and how long and how fast the client trains."""

    client: Callable[[], nn.Module]
    private_x: Tensor
    private_y: Tensor
    public_x: Tensor
    steps: int
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9


def _discriminator(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))


def fsha_game(
    setup: FSHASetup, *, seed: int = 0, detector: GradientScrutinizer | None = None
) -> dict[str, Any]:
    """Run FSHA for ``setup.steps`` client steps; report how well the server inverts the
    client's private rows at the end (beside the baselines) and when ``detector`` flagged."""
    detector = detector or GradientScrutinizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        client, pilot = setup.client(), setup.client()
        x, y, pub = setup.private_x, setup.private_y, setup.public_x
        width = client(x[:2]).flatten(1).shape[1]
        decoder, disc = mlp_decoder(width, x[0].numel(), 256), _discriminator(width)
        opt_c = torch.optim.SGD(client.parameters(), lr=setup.lr, momentum=setup.momentum)
        opt_ae = torch.optim.Adam([*pilot.parameters(), *decoder.parameters()], lr=1e-3)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
        bce = nn.functional.binary_cross_entropy_with_logits
        for _ in range(setup.steps):
            idx = torch.randint(0, x.shape[0], (setup.batch_size,))
            pidx = torch.randint(0, pub.shape[0], (setup.batch_size,))
            act = client(x[idx])
            cut = act.detach().requires_grad_(True)  # what the server receives
            # server: autoencoder on public data, discriminator, then the hijacking gradient
            opt_ae.zero_grad()
            latent = pilot(pub[pidx])
            nn.functional.mse_loss(decoder(latent.flatten(1)), pub[pidx].flatten(1)).backward()
            opt_ae.step()
            opt_d.zero_grad()
            real, fake = disc(latent.detach().flatten(1)), disc(cut.detach().flatten(1))
            (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))).backward()
            opt_d.step()
            out = disc(cut.flatten(1))
            grad = torch.autograd.grad(bce(out, torch.ones_like(out)), cut)[0]
            detector.observe(grad, y[idx])
            opt_c.zero_grad()
            act.backward(grad)
            opt_c.step()
        with torch.no_grad():
            guess = decoder(client(x).flatten(1))
    shape = tuple(x.shape[1:]) if x.dim() == 4 else None
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


__all__ = ["FSHASetup", "GradientScrutinizer", "fsha_game"]
