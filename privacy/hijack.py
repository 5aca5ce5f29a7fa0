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
* :class:`HonestReference` keeps the detector sound under the client's own defenses: heavy
  activation noise leaves an honest server nothing to learn, and its gradients lose their label
  structure too. A replica of the honest server, trained by the client on what it sends, says
  what an honest server would score; where that is low too, a low window is ``cannot_judge``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from privacy.audit import mlp_decoder
from privacy.reconstruction import baselines, image_scores
from sl_pipeline.errors import PrivacyError

RESOLVE_MARGIN = 0.1  # how far above the threshold an honest replica must score to judge
Verdict = Literal["warming", "pass", "cannot_judge", "flagged"]


def label_score(grads: Tensor, labels: Tensor) -> float:
    """``mean cos(same label) - mean cos(different label)`` over a batch's gradients (NaN for
    a batch with one label only)."""
    flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
    y = labels.reshape(-1).to(flat.device)
    unit = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    differ = y[:, None] != y[None, :]
    if not bool(same.any()) or not bool(differ.any()):
        return float("nan")
    return float(cos[same].mean() - cos[differ].mean())


class HonestReference:
    """What an honest server's cut gradients would score for the activations this client
    sends: a replica of the rest of the model (the client knows its architecture and seed),
    trained here by cross-entropy on exactly what was sent and on this client's labels.

    The client's own defenses can leave an honest server nothing to learn (activation noise
    far above the clipped signal): its replica's gradients then lose their label structure
    too, and a low score of the server's is no evidence of hijack. The replica costs the
    client one forward and backward of the server's part per batch."""

    def __init__(self, rest: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.rest, self.optimizer = rest, optimizer

    def observe(self, sent: Tensor, labels: Tensor) -> float:
        """One honest step on ``sent``; returns the score of the replica's cut gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        cut = sent.detach().clone().requires_grad_(True)
        out = self.rest(cut)
        nn.functional.cross_entropy(out, labels.reshape(-1).to(out.device)).backward()
        self.optimizer.step()
        assert cut.grad is not None
        return label_score(cut.grad, labels)


class GradientScrutinizer:
    """Flags a server whose cut gradients stop depending on the labels.

    After ``warmup`` batches, each full window of ``window`` scored batches is judged: its mean
    at or above ``threshold`` passes; below it, the detector flags, unless a ``reference``
    (:class:`HonestReference`) says an honest server's gradients would score below
    ``threshold + margin`` too: that window is ``cannot_judge`` (neither an alarm nor a pass),
    because the client's own defenses left too little label signal for the test to resolve.
    Batches with one label only are skipped. Once flagged, the verdict stays ``flagged``.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        window: int = 5,
        warmup: int = 5,
        *,
        reference: HonestReference | None = None,
        margin: float = RESOLVE_MARGIN,
    ) -> None:
        if window < 1 or warmup < 0 or margin < 0:
            raise PrivacyError("GradientScrutinizer needs window >= 1, warmup >= 0, margin >= 0")
        self.threshold, self.window, self.warmup = threshold, window, warmup
        self.reference, self.margin = reference, margin
        self.scores: deque[float] = deque(maxlen=window)
        self.reference_scores: deque[float] = deque(maxlen=window)
        self.batches = 0
        self.flagged_at: int | None = None
        self.last_score = float("nan")
        self.verdict: Verdict = "warming"
        self.unjudged = 0  # windows below the threshold that the reference could not resolve
        self.judged = 0  # windows judged (pass or flag)

    @property
    def flagged(self) -> bool:
        return self.flagged_at is not None

    @property
    def reference_score(self) -> float:
        """The replica's mean score over the last window (NaN without a reference)."""
        kept = self.reference_scores
        return sum(kept) / len(kept) if kept else float("nan")

    @property
    def run_verdict(self) -> Verdict:
        """The run so far: ``flagged`` once flagged, else ``cannot_judge`` if any low window
        could not be judged, else ``pass`` once a window passed (``warming`` before)."""
        if self.flagged:
            return "flagged"
        if self.unjudged:
            return "cannot_judge"
        return "pass" if self.judged else "warming"

    def observe(self, grads: Tensor, labels: Tensor, sent: Tensor | None = None) -> float:
        """Score one batch's gradients; ``sent`` (the activations they answer, as sent) feeds
        the reference. Returns the score (NaN for a one-label batch)."""
        if self.reference is not None and sent is None:
            raise PrivacyError("a GradientScrutinizer with a reference needs the sent activations")
        self.batches += 1
        if self.reference is not None and sent is not None:
            honest = self.reference.observe(sent, labels)  # an honest server trains on each batch
            if honest == honest:
                self.reference_scores.append(honest)
        score = label_score(grads, labels)
        if score != score:
            return score
        self.last_score = score
        self.scores.append(score)
        if len(self.scores) == self.window and self.batches > self.warmup and not self.flagged:
            self._judge(sum(self.scores) / self.window)
        return score

    def _judge(self, mean: float) -> None:
        if mean >= self.threshold:
            self.verdict, self.judged = "pass", self.judged + 1
        elif self.reference is None or self.reference_score >= self.threshold + self.margin:
            self.verdict, self.judged, self.flagged_at = "flagged", self.judged + 1, self.batches
        else:
            self.verdict, self.unjudged = "cannot_judge", self.unjudged + 1


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
    tunes it. ``defense`` (e.g. :class:`privacy.defenses.ActivationNoise`'s ``apply``) runs on
    the client's activations before the server sees them, in training and at the inversion.
    With ``honest_steps`` the server first trains ``rest`` honestly and returns its true
    gradients, and hijacks only after: an attacker waiting for the detector to lose its
    footing (its honest reference collapsing under the client's noise)."""

    client: Callable[[], nn.Module]
    private_x: Tensor
    private_y: Tensor
    public_x: Tensor
    steps: int
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    scale: float = HIJACK_SCALE
    defense: Callable[[Tensor], Tensor] | None = None  # the client's cut-layer defense
    honest_steps: int = 0  # a patient attacker: honest (with ``rest``) for this many first
    rest: Callable[[], nn.Module] | None = None  # the honest server's part of the model


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


class _Honest:
    """An honest server: trains ``rest`` by cross-entropy on what it receives and returns the
    true gradient at the cut."""

    def __init__(self, rest: nn.Module, lr: float, momentum: float) -> None:
        self.rest = rest
        self.opt = torch.optim.SGD(rest.parameters(), lr=lr, momentum=momentum)

    def step(self, sent: Tensor, labels: Tensor) -> Tensor:
        cut = sent.detach().requires_grad_(True)
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.rest(cut), labels).backward()
        self.opt.step()
        assert cut.grad is not None
        return cut.grad


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
    defend = setup.defense or (lambda act: act)
    with torch.random.fork_rng(devices=[]):
        client, pilot = setup.client(), setup.client()  # a builder may seed the global RNG
        honest = _Honest(setup.rest(), setup.lr, setup.momentum) if setup.rest else None
        torch.manual_seed(seed)
        server = _Server(
            _fresh(pilot), client(x[:2]).flatten(1).shape[1], x[0].numel(), setup.scale
        )
        opt_c = torch.optim.SGD(client.parameters(), lr=setup.lr, momentum=setup.momentum)
        for step in range(setup.steps):
            idx = torch.randint(0, x.shape[0], (setup.batch_size,))
            sent = defend(client(x[idx]))
            pidx = torch.randint(0, pub.shape[0], (setup.batch_size,))
            grad = server.hijack(sent.detach(), pub[pidx])  # it sees only what is sent
            if honest is not None and step < setup.honest_steps:  # its critic trains meanwhile
                grad = honest.step(sent, y[idx])
            detector.observe(grad, y[idx], sent.detach())
            opt_c.zero_grad()
            sent.backward(grad)
            opt_c.step()
        guess = server.invert(defend(client(x)).detach())
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
        "verdict": detector.run_verdict,
        "unjudged_windows": detector.unjudged,
    }


def honest_game(
    setup: FSHASetup,
    rest: Callable[[], nn.Module],
    *,
    seed: int = 0,
    detector: GradientScrutinizer | None = None,
) -> dict[str, Any]:
    """The same client against an honest server (``rest``: the rest of the model, trained by
    cross-entropy on what the client sends) for ``setup.steps`` steps: where the detector
    flagged (a false alarm) and its verdict. ``setup.public_x`` is not used."""
    detector = detector or GradientScrutinizer()
    x, y = setup.private_x, setup.private_y
    defend = setup.defense or (lambda act: act)
    with torch.random.fork_rng(devices=[]):
        client, server = setup.client(), _Honest(rest(), setup.lr, setup.momentum)
        torch.manual_seed(seed)
        opt_c = torch.optim.SGD(client.parameters(), lr=setup.lr, momentum=setup.momentum)
        for _ in range(setup.steps):
            idx = torch.randint(0, x.shape[0], (setup.batch_size,))
            sent = defend(client(x[idx]))
            grad = server.step(sent, y[idx])
            detector.observe(grad, y[idx], sent.detach())
            opt_c.zero_grad()
            sent.backward(grad)
            opt_c.step()
    return {
        "flagged_at_batch": detector.flagged_at,
        "batches": detector.batches,
        "verdict": detector.run_verdict,
        "unjudged_windows": detector.unjudged,
        "min_score": min(detector.scores, default=float("nan")),
        "reference_score": detector.reference_score,
    }


__all__ = [
    "FSHA_STEPS",
    "HIJACK_SCALE",
    "RESOLVE_MARGIN",
    "FSHASetup",
    "GradientScrutinizer",
    "HonestReference",
    "Verdict",
    "fsha_game",
    "honest_game",
    "label_score",
]
