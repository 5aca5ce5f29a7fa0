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


def log_stop(epoch: int, step: int, saved: Path | None, steps_done: int) -> None:
    """What a client stopped by a signal leaves: the state a restart resumes from (its
    checkpoint, or its stop state), or nothing when no step was applied yet."""
    where = f"stopped by signal at epoch {epoch + 1} step {step}"
    if saved is not None:
        log.warning("%s; state saved in %s: the same command resumes here", where, saved)
    elif not steps_done:
        log.warning("%s, before any step was applied: a restart starts afresh", where)
