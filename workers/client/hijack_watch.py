"""The client's hijack detector, wired to the worker: which honest reference it runs, and what
it reports (gauges, one log line per change of verdict, the stop on a flag).

The mechanism, :class:`privacy.hijack.GradientScrutinizer` and its
:class:`~privacy.hijack.HonestReference`, knows nothing of metrics or logs; this module reads
its state after each batch and reports it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from privacy.config import HijackConfig, PrivacyConfig
from privacy.hijack import GradientScrutinizer, HonestReference
from sl_pipeline.config import ModelConfig, TrainConfig
from sl_pipeline.errors import PrivacyError
from sl_pipeline.models import build_segments, make_optimizer
from workers.ops.metrics import WorkerMetrics

log = logging.getLogger("sl_pipeline.client")


def starves_the_server(privacy: PrivacyConfig) -> bool:
    """Whether this client's own defenses can leave an honest server too little label signal
    to learn from (activation noise, NoPeek): then the detector needs an honest reference."""
    noisy = privacy.noise is not None and privacy.noise.sigma > 0
    return noisy or (privacy.nopeek is not None and privacy.nopeek.alpha > 0)


def honest_reference(
    model: ModelConfig, train: TrainConfig, topology: str, device: torch.device
) -> HonestReference:
    """A replica of the rest of the model after this client's segment (the weights every
    party builds from ``model.seed``), trained as the client's own config trains."""
    with torch.random.fork_rng(devices=[]):  # build_segments seeds the global generator
        rest = nn.Sequential(*build_segments(model, topology)[1:]).to(device)
    rest.train()
    t = train
    return HonestReference(
        rest, make_optimizer(list(rest.parameters()), t.optimizer, t.lr, t.momentum)
    )


def build_detector(
    privacy: PrivacyConfig,
    model: ModelConfig,
    train: TrainConfig,
    topology: str,
    *,
    replicable: bool,
    device: torch.device,
) -> GradientScrutinizer:
    """The detector ``privacy.hijack`` asks for (defaults where the section is absent), with
    an honest reference where the client's defenses call for one and its runner can build it
    (``replicable``: the rest of the model is what an honest party computes on its labels)."""
    h = privacy.hijack or HijackConfig()
    reference = None
    if starves_the_server(privacy):
        if replicable:
            reference = honest_reference(model, train, topology, device)
        else:
            log.warning(
                "privacy.hijack: no honest reference for topology %s; under this client's "
                "privacy.noise / privacy.nopeek a low score may be the defense's doing",
                topology,
            )
    return GradientScrutinizer(h.threshold, h.window, h.warmup, reference=reference)


class HijackWatch:
    """Feeds the detector each batch's cut gradient and reports what it decided."""

    def __init__(
        self, detector: GradientScrutinizer, cfg: HijackConfig, metrics: WorkerMetrics
    ) -> None:
        self.detector, self.cfg, self.metrics = detector, cfg, metrics
        metrics.hijack_flagged.set(0)
        metrics.hijack_cannot_judge.set(0)

    def observe(self, grad: torch.Tensor, y: torch.Tensor, sent: torch.Tensor) -> None:
        """Score one batch; with ``privacy.hijack.stop`` a flag raises :class:`PrivacyError`
        (before the gradient touches the weights)."""
        d, metrics = self.detector, self.metrics
        was = d.verdict
        d.observe(grad, y, sent)
        if len(d.scores) == d.window:
            metrics.hijack_score.set(sum(d.scores) / d.window)
        if d.reference_scores:
            metrics.hijack_reference_score.set(d.reference_score)
        metrics.hijack_cannot_judge.set(1 if d.verdict == "cannot_judge" else 0)
        if d.verdict == was:
            return
        if d.verdict == "cannot_judge" and d.unjudged > 1:  # explained once, then counted
            log.info("hijack detector cannot judge again at batch %d", d.batches)
        elif d.verdict == "cannot_judge":
            log.warning(
                "hijack detector cannot judge at batch %d: score %.3f, but an honest server "
                "would score %.3f (under %.3f) for what this client sends; its own defenses "
                "leave too little label signal, so a low score is no evidence of hijack",
                d.batches, sum(d.scores) / d.window, d.reference_score, d.threshold + d.margin,
            )  # fmt: skip
        elif d.verdict == "pass" and was == "cannot_judge":
            log.info("hijack detector judges again at batch %d", d.batches)
        elif d.verdict == "flagged":
            self._flagged()

    def _flagged(self) -> None:
        self.metrics.hijack_flagged.set(1)
        message = (
            f"server hijack suspected at batch {self.detector.flagged_at}: the cut "
            "gradients stopped depending on the labels"
        )
        if self.cfg.stop:
            raise PrivacyError(message, hint="privacy.hijack.stop ended training")
        log.warning("%s (privacy.hijack.stop is off: training goes on)", message)

    def report(self) -> dict[str, object]:
        """The verdict for the client's summary, and how many windows it could not judge."""
        d = self.detector
        return {"hijack_verdict": d.run_verdict, "hijack_unjudged_windows": d.unjudged}


__all__ = ["HijackWatch", "build_detector", "honest_reference", "starves_the_server"]
