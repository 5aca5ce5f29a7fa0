"""The canary audit of DP-SGD: an empirical lower bound on epsilon beside the accountant's.

``sl-pipeline audit --canary-runs N`` trains the audited client's split model ``2N`` times
(the client segment under its DP-SGD settings, the server segment as in the run), half with a
canary record, and bounds epsilon from below with :func:`privacy.canary.run_canary_game`. It
runs the game twice: with the server segment trained without DP on the activations (what the
platform does) and with it frozen (the premise of DP-SGD's epsilon).
"""

from __future__ import annotations

from typing import Any

import torch

from sl_pipeline.config import ClientConfig
from sl_pipeline.data import PartyData
from sl_pipeline.errors import ConfigError
from sl_pipeline.models import build_segments

CANARY_TOPOLOGIES = ("vanilla",)


def check_canary(topology: str, privacy: Any, runs: int) -> None:
    """Refuse ``--canary-runs`` where the game does not model the run, before training."""
    if runs == 0:
        return
    if runs < 4:
        raise ConfigError(f"--canary-runs {runs} must be 0 (off) or at least 4")
    if topology not in CANARY_TOPOLOGIES:
        raise ConfigError(
            f"--canary-runs applies to topology {', '.join(CANARY_TOPOLOGIES)}, not {topology!r}"
        )
    if privacy.dpsgd is None:
        raise ConfigError(
            "--canary-runs audits DP-SGD; set privacy.dpsgd.noise_multiplier (or target_epsilon)"
        )
    if not privacy.dpsgd.poisson_sampling:
        raise ConfigError(
            "--canary-runs audits Poisson-sampled DP-SGD; remove privacy.dpsgd.poisson_sampling "
            "= false (fixed batches differ with and without the canary)"
        )


def make_canary(data: PartyData) -> tuple[torch.Tensor, torch.Tensor]:
    """A mislabelled outlier: every input feature at its training maximum, labelled with the
    class after that of its nearest training row (a record the model would not predict)."""
    x, y = data.train.x, data.train.y
    assert y is not None
    canary = x.amax(dim=0, keepdim=True)
    nearest = int(torch.cdist(canary.flatten(1), x.flatten(1)).argmin())
    return canary, ((y[nearest] + 1) % data.classes).reshape(1).to(torch.int64)


def canary_audit(
    cfg: ClientConfig, data: PartyData, privacy: Any, runs: int, seed: int
) -> dict[str, Any]:
    """The lower bound with the server trained and with it frozen, and the accountant's figure."""
    from privacy.canary import CanaryGame, run_canary_game

    canary_x, canary_y = make_canary(data)
    assert data.train.y is not None

    def segments() -> tuple[torch.nn.Module, torch.nn.Module]:
        parts = build_segments(cfg.model, "vanilla")
        return parts[0], torch.nn.Sequential(*parts[1:])

    out: dict[str, Any] = {"canary_runs": runs}
    for trained, suffix in ((True, ""), (False, "_frozen_server")):
        game = CanaryGame(
            segments=segments,
            x=data.train.x,
            y=data.train.y,
            canary_x=canary_x,
            canary_y=canary_y,
            dpsgd=privacy.dpsgd,
            epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            train_server=trained,
            init_seed=cfg.model.seed,
        )
        result = run_canary_game(game, runs, seed=seed)
        out[f"canary_epsilon_lower_bound{suffix}"] = result["epsilon_lower_bound"]
        out["canary_accountant_epsilon"] = result["accountant_epsilon"]
        out["canary_accountant_steps"] = result["accountant_steps"]
        out["canary_accountant_sample_rate"] = result["accountant_sample_rate"]
    return out


__all__ = ["CANARY_TOPOLOGIES", "canary_audit", "check_canary", "make_canary"]
