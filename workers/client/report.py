"""Figures a client's summary derives from its run (pure functions), and its stop notice."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

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


def log_stop(epoch: int, step: int, saved: Path | None, steps_done: int, run_id: str) -> None:
    """What a client stopped by a signal leaves: the state a restart resumes from (its
    checkpoint, or its stop state), nothing when no step was applied yet, or nothing at all
    (no [checkpoint] dir and no client.save): then its steps in the run cannot be replayed."""
    where = f"stopped by signal at epoch {epoch + 1} step {step}"
    if saved is not None:
        log.warning("%s; state saved in %s: the same command resumes here", where, saved)
    elif not steps_done:
        log.warning("%s, before any step was applied: a restart starts afresh", where)
    else:
        run = run_id or "RUN"
        log.warning(
            "%s; with neither [checkpoint] dir nor client.save nothing was saved, so a "
            "restart in run %s is refused as stale: `sl-pipeline runs stop %s` ends that "
            "run, or train another (--run NAME)",
            where,
            run,
            run,
        )


def _finite(value: float | None) -> float | None:
    """None for NaN or inf: ``json.dumps`` would print a bare NaN, which is not JSON."""
    return value if value is not None and math.isfinite(value) else None


def client_summary(client: Any, wall: float) -> dict[str, Any]:
    """The JSON summary a ``ClientWorker`` prints when it ends (``--json``) and the demo adds
    up (``Any``: this module is imported by the worker's, not the other way round)."""
    return {
        "topology": client.topology,
        "dataset": client.cfg.data.dataset or client.cfg.data.path,
        "client": client.cfg.client.name,
        "run": client.link.run or client.run_id or None,  # behind a relay: its answers say
        "epochs": client.cfg.train.epochs,
        "steps": client.steps_done,
        "test_accuracy": client.last_accuracy,
        "test_samples": len(client.data.test),
        **({"aligned_rows": client.aligned_rows} if client.aligned_rows is not None else {}),
        "train_loss": _finite(client.last_loss),  # a party without labels has none
        "bytes_sent": client.link.bytes["sent"],
        "bytes_received": client.link.bytes["received"],
        "retries": client.link.retries,
        "pipeline_depth": client.cfg.train.pipeline_depth,  # with auto: the depth it chose
        "device": str(client.runner.device),
        "resumed_from": client.resumed_from,
        "rewinds": client.undo.rewinds,
        "resent_steps": client.link.recorded.resent,  # to a relay that lost them
        "stopped_early": client.stopped,
        "best_epoch": best_epoch(client.history),
        "model": model_path(client.cfg, client.base) if client.steps_done else None,
        "wall_seconds": round(wall, 3),
        **client.runner.report(),
    }
