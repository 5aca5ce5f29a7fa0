"""The malicious-server audit: FSHA against the audited client, and the hijack detector.

``sl-pipeline audit --fsha-runs N [--fsha-steps S]`` plays :func:`privacy.hijack.fsha_game` N
times (seeded) against the audited client's segment for S client steps (default 2000), with the
server's public data standing in as the client's test rows, and reports how often the client's
:class:`~privacy.hijack.GradientScrutinizer` flagged within the first epoch of batches, and how
well the server inverts the client's rows at the end. Every audit also runs
the detector on the honest run's real cut gradients (where the client holds labels), so its
false positives show up as ``hijack_flagged``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from privacy.defenses import build_defenses
from privacy.hijack import FSHA_STEPS, FSHASetup, GradientScrutinizer, fsha_game
from sl_pipeline.config import ClientConfig
from sl_pipeline.data import PartyData
from sl_pipeline.errors import ConfigError
from sl_pipeline.models import build_segments
from workers.client.hijack_watch import build_detector
from workers.client.host import RunnerConfig
from workers.client.worker import ClientWorker

FSHA_TOPOLOGIES = ("vanilla",)


def check_fsha(topology: str, runs: int, steps: int = FSHA_STEPS) -> None:
    if runs and topology not in FSHA_TOPOLOGIES:
        raise ConfigError(
            f"--fsha-runs applies to topology {', '.join(FSHA_TOPOLOGIES)}, not {topology!r}"
        )
    if runs < 0:
        raise ConfigError(f"--fsha-runs {runs} must be 0 (off) or more")
    if steps < 1:
        raise ConfigError(f"--fsha-steps {steps} must be at least 1")


def attach_scrutinizer(client: ClientWorker) -> Any:
    """Watch the cut gradients this client receives (on this instance only); ``None`` where
    the client holds no labels (a vertical feature party cannot scrutinise) or protects them
    (u-shaped: its honest cut gradients are label-independent, see ``PrivacyConfig``)."""
    runner: Any = client.runner
    if client.data.train.y is None or runner.privacy.label_protection_on:
        return None
    model, train = runner.cfg.model, runner.cfg.train
    detector = build_detector(
        runner.privacy, model, train, client.topology, replicable=runner.replicable,
        device=runner.device,
    )  # fmt: skip
    train_step, apply_gradient = runner.train_step, runner.apply_gradient
    current: dict[str, torch.Tensor] = {}

    async def step(step: int, x: torch.Tensor, y: Any, ids: torch.Tensor) -> float:
        if y is not None:
            current["y"] = y
        return float(await train_step(step, x, y, ids))

    def apply(x: torch.Tensor, act: torch.Tensor, sent: torch.Tensor, grad: torch.Tensor) -> None:
        if "y" in current and grad.shape[0] == current["y"].shape[0]:
            detector.observe(grad, current["y"], sent)
        apply_gradient(x, act, sent, grad)

    runner.train_step, runner.apply_gradient = step, apply
    return detector


def hijack_measures(detectors: list[GradientScrutinizer | None]) -> dict[str, Any]:
    """The honest run's detectors (any flag is a false alarm): whether one flagged, the
    lowest score of their last window, the run's verdict (``cannot_judge`` where a low window
    was below what the test resolves), and the honest reference's last score."""
    watching = [d for d in detectors if d is not None]
    if not watching:
        return {}
    verdicts = {d.run_verdict for d in watching}
    order = ("flagged", "cannot_judge", "pass", "warming")
    return {
        "hijack_flagged": any(d.flagged for d in watching),
        "hijack_min_score": min(min(d.scores, default=math.inf) for d in watching),
        "hijack_verdict": next(v for v in order if v in verdicts),
        "hijack_reference_score": min(d.reference_score for d in watching),
    }


def fsha_audit(
    cfg: ClientConfig, data: PartyData, runs: int, seed: int, steps: int = FSHA_STEPS
) -> dict[str, Any]:
    """FSHA ``runs`` times for ``steps`` client steps: how many runs the detector flagged
    within the first epoch of batches, and the inversion after ``steps``."""
    assert data.train.y is not None
    t = cfg.train
    epoch = -(-len(data.train) // t.batch_size)  # batches in one epoch

    def segment() -> torch.nn.Module:
        return build_segments(cfg.model, "vanilla")[0]

    privacy = RunnerConfig.of(cfg).privacy
    found = []
    for run in range(runs):
        # the client's own cut-layer defense, its noise seeded for the audit to repeat
        noise = torch.Generator().manual_seed(seed * 1000 + run)
        defense = build_defenses(privacy, generator=noise)
        setup = FSHASetup(
            segment, data.train.x, data.train.y, data.test.x, steps, t.batch_size, t.lr,
            t.momentum, defense=defense.apply,
        )  # fmt: skip
        cpu = torch.device("cpu")
        detector = build_detector(privacy, cfg.model, t, "vanilla", replicable=True, device=cpu)
        found.append(fsha_game(setup, seed=seed * 1000 + run, detector=detector))
    flagged = [r["flagged_at_batch"] for r in found if r["flagged_at_batch"] is not None]
    in_epoch = [at for at in flagged if at <= epoch]
    out: dict[str, Any] = {
        "fsha_runs": runs,
        "fsha_steps": steps,
        "fsha_detected": len(in_epoch),  # within the first epoch
        "fsha_detected_within_batches": max(in_epoch) if in_epoch else None,
        "fsha_epoch_batches": epoch,
        # never flagged, and some low window the detector could not judge (its own noise)
        "fsha_cannot_judge": sum(r["verdict"] == "cannot_judge" for r in found),
        "fsha_mse": sum(r["fsha_mse"] for r in found) / runs,
        "fsha_nearest_public_mse": found[0]["fsha_nearest_public_mse"],
    }
    if found[0]["fsha_ssim"] is not None:
        out["fsha_ssim"] = sum(r["fsha_ssim"] for r in found) / runs
        out["fsha_nearest_public_ssim"] = found[0]["fsha_nearest_public_ssim"]
    return out


__all__ = [
    "FSHA_STEPS",
    "FSHA_TOPOLOGIES",
    "attach_scrutinizer",
    "check_fsha",
    "fsha_audit",
    "hijack_measures",
]
