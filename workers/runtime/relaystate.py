"""A relay's checkpoints: what it saves, what it restores, and its log of the steps since.

Every ``checkpoint.every_steps`` applied steps, before that step's reply leaves: its
segment's weights, optimizer state, ``steps_applied``, RNG state, reply cache and applied-step
log. With ``every_steps`` above 1, also the requests applied since, in a log beside the
checkpoints (:class:`workers.runtime.requestlog.RequestLog`): after a restart the relay runs
the steps it lost again itself, in the order it first applied them, before it takes a
message (:meth:`workers.relay.RelayWorker.on_start`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sl_pipeline.config import MAX_PIPELINE_DEPTH, RelayConfig
from sl_pipeline.errors import ConfigError
from sl_pipeline.limits import Limits
from sl_pipeline.messages import Message
from workers.ops.metrics import WorkerMetrics
from workers.runtime.appliedlog import AppliedLog
from workers.runtime.checkpoint import CheckpointStore, check_fingerprint, restore_rng, rng_state
from workers.runtime.requestlog import RequestLog
from workers.runtime.savedmodel import remove_empty

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
    limits: Limits
    requests: RequestLog | None  # with checkpoint.every_steps > 1: the steps since the last
    pending: list[Message]  # the steps its restart lost, to run again (in order) at its start
    replaying: bool  # until they all ran: no checkpoint (the log must keep them)
    _saved_at: int
    made_folders: list[Path]  # by its start: removed again if it never serves

    async def on_never_served(self, bound: bool) -> None:
        """Its port taken: the folders its start made removed while empty (a refused start
        left its ``state/``). Refused once bound (its upstream not there), it stops as ever."""
        if bound:
            await super().on_never_served(bound)  # type: ignore[misc]
            return
        if self.requests is not None:
            self.requests.close()
        if self.ckpt is not None:
            self.ckpt.discard_if_unused()
        remove_empty(self.made_folders)

    def _open_requests(self, every: int) -> RequestLog | None:
        if self.ckpt is None or every <= 1:
            return None
        if every > MAX_PIPELINE_DEPTH + 1:  # the server holds each client's newest 16 replies
            raise ConfigError(
                f"checkpoint.every_steps = {every} in relay {self.cfg.relay.name}'s config: at "
                f"most {MAX_PIPELINE_DEPTH + 1}, as a restart loses up to every_steps - 1 steps "
                f"and the server answers them again only from its cache of each client's "
                f"newest {MAX_PIPELINE_DEPTH}"
            )
        fsync, cap = self.cfg.checkpoint.fsync, self.cfg.relay.request_log_mib
        return RequestLog(self.ckpt.directory, self.cfg.relay.name, fsync, int(cap * 2**20))

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
        }

    def _restore(self) -> int:
        found = self.ckpt.load_latest() if self.ckpt is not None else None
        if found is None:
            self._restore_requests()
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
        self._restore_requests()
        return self.steps_applied

    def _restore_requests(self) -> None:
        self.pending = (
            [] if self.requests is None else self.requests.read(self.steps_applied, self.limits)
        )
        self.replaying = bool(self.pending)
        if self.pending:
            log.warning("relay lost %d applied steps: it runs them again", len(self.pending))

    def checkpoint(self, force: bool = False) -> None:
        """Save when ``every_steps`` steps were applied since the last save (or ``force``)."""
        due = self.steps_applied - self._saved_at >= max(1, self.cfg.checkpoint.every_steps)
        if self.replaying:  # a lost step not run again yet: the log and the checkpoint stay
            return
        if self.ckpt is not None and self.steps_applied != self._saved_at and (force or due):
            self.ckpt.save(self._state(), self.steps_applied)
            self._saved_at = self.steps_applied
            self.metrics.checkpoints_total.inc()
            if self.requests is not None:
                self.requests.checkpointed()

    def _log_step(self, msg: Message) -> None:
        """After a step is applied, before its reply leaves: its request is on disk, or a
        checkpoint holds it (one that would take the log over its cap)."""
        if self.requests is not None and not self.requests.append(self.steps_applied, msg):
            log.info("%s is full (relay.request_log_mib): checkpointing", self.requests.path)
            self.checkpoint(force=True)
