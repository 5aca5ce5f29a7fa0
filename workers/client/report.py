"""Figures a client's summary derives from its run (pure functions), and its stop notice."""

from __future__ import annotations

import logging
from pathlib import Path

from sl_pipeline.config import ClientConfig, resolve_path

log = logging.getLogger("sl_pipeline.client")

History = list[tuple[int, float | None, float | None]]  # (1-based epoch, accuracy, loss)


def best_epoch(history: History) -> int | None:
    """The 1-based epoch with the best test accuracy (lowest train loss without labels;
    None for a party told neither, whose loss is NaN: a vertical feature party)."""
    scored = [(acc, e) for e, acc, _ in history if acc is not None]
    if scored:
        return max(scored, key=lambda t: (t[0], -t[1]))[1]
    losses = [(loss, e) for e, _, loss in history if loss is not None and loss == loss]
    return min(losses)[1] if losses else None


def model_path(cfg: ClientConfig, base: Path) -> str | None:
    """Where the client saved its segment(s), if it saves them."""
    save = cfg.client.save
    return str(resolve_path(base, save, "client.save", must_exist=False)) if save else None


def log_stop(epoch: int, step: int, checkpointed: bool, run_id: str) -> None:
    """What a client stopped by a signal leaves: a resumable state, or a run it cannot
    rejoin (its steps there cannot be replayed without a checkpoint)."""
    where = f"stopped by signal at epoch {epoch + 1} step {step}"
    if checkpointed:
        log.warning("%s; state saved: a restart resumes here", where)
        return
    run = run_id or "RUN"
    log.warning(
        "%s; no [checkpoint] dir, so this client cannot resume run %s: a restart is refused "
        "as stale; `sl-pipeline runs stop %s` ends that run, or train another (--run NAME)",
        where,
        run,
        run,
    )
