"""UnSplit (Erdogan et al. 2022): model inversion with no auxiliary data.

*Threat model.* An honest-but-curious server that knows the client segment's architecture but
neither its weights nor any data of the kind. It observes the victim's activations ``z`` and
searches, alternately, for inputs ``x`` and surrogate weights ``w`` with
``segment_w(x) ~ z``, with a total-variation prior that favours smooth images. It is the
no-auxiliary-data counterpart of :mod:`privacy.reconstruction`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from privacy.reconstruction import image_scores
from sl_pipeline.errors import PrivacyError


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels of ``(N, C, H, W)`` images."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def unsplit_attack(
    segment: Callable[[], nn.Module],
    victim_acts: Tensor,
    image_shape: tuple[int, ...],
    *,
    rounds: int = 20,
    inner_steps: int = 20,
    lr: float = 0.01,
    tv: float = 0.05,
    seed: int = 0,
) -> Tensor:
    """Reconstructions in [0, 1] of the images behind ``victim_acts`` (no auxiliary data)."""
    if rounds < 1 or inner_steps < 1:
        raise PrivacyError("unsplit_attack needs rounds >= 1 and inner_steps >= 1")
    z = victim_acts.detach().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        surrogate = segment()
        logits = torch.zeros((z.shape[0], *image_shape), requires_grad=True)  # mid-grey start
        opt_x = torch.optim.Adam([logits], lr=lr * 10)
        opt_w = torch.optim.Adam(surrogate.parameters(), lr=lr)
        for _ in range(rounds):
            for opt in (opt_x, opt_w):
                for _ in range(inner_steps):
                    opt.zero_grad()
                    x = torch.sigmoid(logits)
                    fit = nn.functional.mse_loss(surrogate(x).reshape(z.shape), z)
                    (fit + tv * total_variation(x)).backward()
                    opt.step()
    return torch.sigmoid(logits).detach()


def unsplit_audit(
    segment: Callable[[], nn.Module],
    victim_x: Tensor,
    victim_acts: Tensor,
    *,
    seed: int = 0,
    **settings: Any,
) -> dict[str, Any]:
    """UnSplit's MSE and SSIM on the victims, beside the constant mid-grey image."""
    shape = tuple(victim_x.shape[1:])
    guess = unsplit_attack(segment, victim_acts, shape, seed=seed, **settings)
    found = image_scores(guess, victim_x, shape)
    grey = image_scores(torch.full_like(victim_x, 0.5), victim_x, shape)
    return {
        "unsplit_mse": found["mse"],
        "unsplit_ssim": found["ssim"],
        "baseline_grey_mse": grey["mse"],
        "baseline_grey_ssim": grey["ssim"],
    }


__all__ = ["total_variation", "unsplit_attack", "unsplit_audit"]
