"""Leakage audits we run against ourselves: pure functions on tensors, no I/O.

* :func:`dcor_leakage` — distance correlation between held-out inputs and their activations.
* :func:`reconstruction_attack` — a decoder trained on auxiliary (input, activation) pairs
  tries to invert the victim's activations; reports MSE and, for images, SSIM.
* :func:`label_leak_auc` — the norm and direction attacks of Li et al. 2022 on cut gradients.

Each measures one attack; a low number says this attack failed, not that no attack exists.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from privacy.nopeek import distance_correlation
from sl_pipeline.errors import PrivacyError


def dcor_leakage(inputs: Tensor, activations: Tensor, *, batch_size: int = 512) -> float:
    """Mean distance correlation over consecutive batches of ``batch_size`` (held-out data).

    Batching keeps memory at O(batch_size^2); a trailing batch smaller than 2 is dropped.
    """
    if batch_size < 2:
        raise PrivacyError(
            f"batch_size = {batch_size} is out of range; allowed: >= 2",
            hint="use a batch of at least a few hundred for a stable estimate",
        )
    n = inputs.shape[0]
    values: list[float] = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x, z = inputs[start : start + batch_size], activations[start : start + batch_size]
            if x.shape[0] >= 2:
                values.append(float(distance_correlation(x, z)))
    return float(np.mean(values)) if values else 0.0


# --------------------------------------------------------------------------- SSIM


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: Tensor, y: Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of image batches ``(N, C, H, W)``, Gaussian window.

    Uses K1 = 0.01, K2 = 0.03, a ``window``-sized Gaussian of std ``sigma`` (shrunk to the
    image size when the image is smaller) and 'valid' filtering, averaged over all pixels,
    channels and images. ``ssim(x, x) == 1``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise PrivacyError(
            f"ssim needs two (N, C, H, W) tensors of one shape, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    dtype = torch.float64  # E[x^2] - E[x]^2 loses too much in float32 near constant images
    x, y = x.to(dtype), y.to(dtype)
    channels = x.shape[1]
    w = _gaussian_window(size, sigma, dtype).to(x.device).expand(channels, 1, size, size)

    def filt(t: Tensor) -> Tensor:
        return nn.functional.conv2d(t, w, groups=channels)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx**2 + my**2 + c1) * (vx + vy + c2)
    return (num / den).mean()


# ------------------------------------------------------------------ reconstruction


def mlp_decoder(
    d_in: int, d_out: int, hidden: int, generator: torch.Generator | None = None
) -> nn.Module:
    """Three linear layers. With ``generator``, their initial weights are drawn from it alone
    (the draws ``nn.Linear`` makes from the global generator, in the same order: the same
    weights as after ``torch.manual_seed`` with its seed), so decoders can be built in threads."""
    device = "meta" if generator is not None else None  # meta: no draws from the global one
    decoder = nn.Sequential(
        nn.Linear(d_in, hidden, device=device),
        nn.ReLU(),
        nn.Linear(hidden, hidden, device=device),
        nn.ReLU(),
        nn.Linear(hidden, d_out, device=device),
    )
    if generator is None:
        return decoder
    decoder = decoder.to_empty(device="cpu")
    for layer in decoder:
        if isinstance(layer, nn.Linear):  # as nn.Linear.reset_parameters
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return decoder


def reconstruction_attack(
    aux_inputs: Tensor,
    aux_acts: Tensor,
    victim_inputs: Tensor,
    victim_acts: Tensor,
    *,
    epochs: int = 30,
    seed: int = 0,
    hidden: int = 256,
    lr: float = 1e-3,
    batch_size: int = 64,
    image_shape: tuple[int, int, int] | None = None,
    data_range: float = 1.0,
) -> dict[str, Any]:
    """Train an MLP decoder activations -> inputs on auxiliary pairs, attack the victim's.

    The attacker model: it holds data of the same kind as the victim's and can query the
    client segment (so it has ``(aux_inputs, aux_acts)`` pairs), and it observes the victim's
    activations. Returns ``{"reconstruction_mse": float, "ssim": float | None}``; SSIM is
    computed when ``image_shape = (C, H, W)`` is given or the inputs are 4-D images.
    Reproducible for a given ``seed``; the global RNG state is left untouched.
    """
    if epochs < 1:
        raise PrivacyError(f"epochs = {epochs} is out of range; allowed: >= 1")
    if image_shape is None and victim_inputs.dim() == 4:
        image_shape = tuple(victim_inputs.shape[1:])  # type: ignore[assignment]
    ax, aa = aux_inputs.flatten(1).float(), aux_acts.detach().flatten(1).float()
    vx, va = victim_inputs.flatten(1).float(), victim_acts.detach().flatten(1).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = mlp_decoder(aa.shape[1], ax.shape[1], hidden)
        opt = torch.optim.Adam(decoder.parameters(), lr=lr, fused=True)
        for _ in range(epochs):
            for idx in torch.randperm(ax.shape[0]).split(batch_size):
                opt.zero_grad()
                nn.functional.mse_loss(decoder(aa[idx]), ax[idx]).backward()
                opt.step()
    with torch.no_grad():
        recon = decoder(va)
        mse = float(nn.functional.mse_loss(recon, vx))
        score = None
        if image_shape is not None:
            shape = (-1, *image_shape)
            score = float(ssim(recon.reshape(shape), vx.reshape(shape), data_range=data_range))
    return {"reconstruction_mse": mse, "ssim": score}


# ------------------------------------------------------------------------ labels


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    # imported here: a client imports this module (its hijack detector), and sklearn.metrics
    # with scipy costs its start-up ~2 s of CPU
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, scores))
    return max(auc, 1.0 - auc)


def label_leak_auc(grads: Tensor, labels: Tensor) -> dict[str, float]:
    """AUC of two label-inference attacks on per-example cut gradients (Li et al. 2022).

    * norm attack: score each example by ``||g_i||_2``;
    * direction attack: score by the cosine between ``g_i`` and a reference direction, here
      the top right-singular vector of the (uncentred) gradient matrix — it needs no label
      and, when the classes point in opposite directions, separates them like the paper's
      cosine-to-a-reference-example attack without depending on which example is picked.

    The attacker does not know which side is positive, so each AUC is ``max(auc, 1 - auc)``;
    ``label_leak_auc`` is the stronger of the two. 0.5 means no leak, 1.0 a full leak.
    """
    flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
    y = labels.detach().reshape(-1).cpu().numpy()
    if y.shape[0] != flat.shape[0] or len(np.unique(y)) != 2:
        raise PrivacyError(
            "label_leak_auc needs one binary label per example, both classes present",
            hint="audit a batch holding positive and negative examples",
        )
    norms = torch.linalg.vector_norm(flat, dim=1)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    cos = (flat @ vh[0]) / norms.clamp_min(1e-12)
    norm_auc = _auc(y, norms.cpu().numpy())
    direction_auc = _auc(y, cos.cpu().numpy())
    return {
        "norm_auc": norm_auc,
        "direction_auc": direction_auc,
        "label_leak_auc": max(norm_auc, direction_auc),
    }


__all__ = ["dcor_leakage", "label_leak_auc", "mlp_decoder", "reconstruction_attack", "ssim"]
