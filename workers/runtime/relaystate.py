"""A relay's checkpoints: what it saves, what it restores, and its log of the steps since.

Every ``checkpoint.every_steps`` applied steps, before that step's reply leaves: its
segment's weights, optimizer state, ``steps_applied``, RNG state, reply cache and applied-step
log. With ``every_steps`` above 1, also the digests of the requests applied since, in a log
beside the checkpoints (:class:`workers.runtime.digestlog.DigestLog`): after a restart the
steps it lost are run again only on the requests first sent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sl_pipeline.config import RelayConfig
from sl_pipeline.messages import Message
from workers.ops.metrics import WorkerMetrics
from workers.runtime.appliedlog import AppliedLog
from workers.runtime.checkpoint import CheckpointStore, check_fingerprint, restore_rng, rng_state
from workers.runtime.digestlog import DigestLog

if TYPE_CHECKING:
    from workers.server.replycache import ReplyCache

log = logging.getLogger("sl_pipeline.relay")


class RelayCheckpoints:
    """The relay's checkpoint side (mixed into :class:`workers.relay.RelayWorker`)."""

    cfg: RelayConfig
    fingerprint: str
    segment: torch.nn.Module
    optimizer: torch.optim.Optimizer
    metrics: WorkerMetrics
    replies: ReplyCache
    applied_log: AppliedLog
    trained_run: str
    steps_applied: int
    ckpt: CheckpointStore | None
    digests: DigestLog | None  # with checkpoint.every_steps > 1: the steps since the last
    _saved_at: int

    def _open_digests(self, every: int) -> DigestLog | None:
        if self.ckpt is None or every <= 1:
            return None
        fsync = self.cfg.checkpoint.fsync
        return DigestLog(self.ckpt.directory, self.cfg.relay.name, fsync)

    def _state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "trained_run": self.trained_run,
            "segment": dict(self.segment.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "steps_applied": self.steps_applied,
            "rng": rng_state(),
            "replies": self.replies.entries(),
            "applied_log": self.applied_log.state(),
            "lost": self.digests.state() if self.digests is not None else [],
        }

    def _restore(self) -> int:
        found = self.ckpt.load_latest() if self.ckpt is not None else None
        if found is None:
            self._restore_digests([])
            return 0
        state, path = found
        check_fingerprint(state, path, self.fingerprint)
        self.segment.load_state_dict(state["segment"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_applied = int(state["steps_applied"])
        restore_rng(state["rng"])
        self.replies.load(state["replies"])
        self.applied_log = AppliedLog.from_state(state["applied_log"])
        self.trained_run = str(state.get("trained_run", ""))
        log.info("relay resumed from checkpoint %s at %d applied steps", path, self.steps_applied)
        self._restore_digests(list(state.get("lost", [])))
        return self.steps_applied

    def _restore_digests(self, kept: list[Any]) -> None:
        if self.digests is None:
            return
        lost = self.digests.restore(self.steps_applied, kept)
        if lost:
            log.warning("relay lost %d applied steps: its clients resend them", lost)

    def checkpoint(self, force: bool = False) -> None:
        """Save when ``every_steps`` steps were applied since the last save (or ``force``)."""
        due = self.steps_applied - self._saved_at >= max(1, self.cfg.checkpoint.every_steps)
        if self.ckpt is not None and self.steps_applied != self._saved_at and (force or due):
            self.ckpt.save(self._state(), self.steps_applied)
            self._saved_at = self.steps_applied
            self.metrics.checkpoints_total.inc()
            if self.digests is not None:
                self.digests.checkpointed()

    def _check_lost(self, msg: Message) -> str | None:
        """Before a step runs: a step the relay lost comes again as the request first sent."""
        return self.digests.check(msg) if self.digests is not None else None

    def _log_step(self, msg: Message, digest: str | None) -> None:
        """After a step is applied, before its reply leaves (and before a checkpoint)."""
        if self.digests is not None:
            self.digests.ran(msg)
            self.digests.append(self.steps_applied, msg, digest)
