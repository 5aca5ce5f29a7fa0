"""The client worker: holds the data and the first layers, drives the training.

Per batch: its segment to the cut layer, the activations sent (labels only where the server
holds the loss), the cut gradient awaited and backpropagated locally; an evaluation on its own
test split after each epoch. Topology-specific steps live in :mod:`workers.client.steps`."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio
from tqdm import tqdm

from privacy.config import PrivacyConfig
from sl_pipeline.config import ClientConfig, check_endpoint
from sl_pipeline.errors import PeerError, TransportError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.messages import Kind, Message
from sl_pipeline.runid import check_run_id
from sl_pipeline.sources import Source, load_source
from sl_pipeline.transport import DealerConnection
from workers.client.align import aligned_data, first_data, psi_key, rows_file
from workers.client.host import RunnerConfig
from workers.client.link import BYE_LINGER_MS, Stopped, Upstream, make_handshake
from workers.client.microbatch import MAX_DEPTH, Pipeline, check_depth
from workers.client.parties import for_parties
from workers.client.private import check_checkpoints, check_dpsgd_kept, check_replayable
from workers.client.replies import check_same_run, checked_welcome
from workers.client.report import client_summary, log_stop, model_path
from workers.client.resend import rejoined
from workers.client.rollback import NOTHING, Rewind, UndoPoints
from workers.client.staleness import configured_momentum
from workers.client.steps import StepRunner
from workers.client.stopstate import ClientStore
from workers.ops.http import OpsServer
from workers.ops.metrics import WorkerMetrics
from workers.runtime.checkpoint import restore_rng, rng_state
from workers.runtime.savedmodel import check_writable
from workers.runtime.startup import install_stop_signals, ops_tokens, start_ops
from workers.topologies import topology

log = logging.getLogger("sl_pipeline.client")


class _Stopped(Stopped):
    """Raised between steps on SIGTERM/SIGINT (``Stopped``: in a wait for the next hop)."""


class ClientWorker:
    def __init__(
        self,
        cfg: ClientConfig,
        base: Path,
        metrics: WorkerMetrics | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg, self.base = cfg, base
        self.metrics = metrics or WorkerMetrics("client")
        self.progress = progress
        self.resumable = True  # False where nobody can rerun it (an audit's temporary folder)
        self.topology: str = cfg.client.topology
        check_endpoint(cfg.client.server, "client.server")
        PrivacyConfig.from_mapping(cfg.privacy).check_placement(
            self.topology, server=False, holds_labels=cfg.client.role == "label"
        )
        check_checkpoints(cfg)
        if cfg.client.run:
            check_run_id(cfg.client.run, "client.run")
        m = cfg.model
        source = load_source(cfg.data, base, m.classes, m.in_shape)  # every data error: now
        self.psi_key = psi_key(cfg, base, source.ids is not None)
        self.pending: Source | None = source if self.psi_key else None  # rows to align first
        self.aligned_rows: int | None = None
        self.data = first_data(cfg, source, aligned_later=self.pending is not None)
        self.runner: StepRunner = topology(self.topology).runner(self, RunnerConfig.of(cfg))
        depth = check_depth(self)  # auto where this runner cannot pipeline: 1 (the plain loop)
        self.cfg = replace(cfg, train=replace(cfg.train, pipeline_depth=depth))
        self.link = Upstream(cfg, self.metrics, make_handshake(cfg, base, self.topology))
        self.link.adaptive_wait = self.runner.adaptive_wait
        self.epoch = self.step = self.steps_done = 0
        self.last_loss: float | None = None
        self.last_accuracy: float | None = None
        self.epoch_losses: list[float] = []
        self.start = (0, 0)  # (epoch, step) to continue from
        self.last_applied: tuple[int, int] | None = None
        self.run_id = cfg.client.run
        self.history: list[tuple[int, float | None, float | None]] = []  # epoch, acc, loss
        self.stop = self.link.stop  # SIGTERM/SIGINT also end a wait for the next hop
        self.stopped = False
        self.undo = UndoPoints()
        self.ckpt = ClientStore(cfg, base)
        self.resumed_from = self._restore()

    async def align(self) -> None:
        """Keep the rows both parties hold, in the agreed order; split and encode them."""
        assert self.pending is not None and self.psi_key is not None
        saved = rows_file(self.cfg, self.base)
        self.data, self.aligned_rows = await aligned_data(
            self.cfg,
            self.pending,
            self.psi_key,
            self.request,
            self.message,
            saved,
            resuming=self.resumed_from > 0,
        )
        self.pending = None

    # ---- checkpoints ---------------------------------------------------------------------
    def _state(self, next_step: int) -> dict[str, Any]:
        return {
            "modules": {n: dict(m.state_dict()) for n, m in self.runner.modules.items()},
            "optimizer": self.runner.optimizer.state_dict(),
            "epoch": self.epoch,
            # the end of its run, whatever epochs a later start asks for: that start trains
            # a new run (resumed as "epoch 9 of 150", a finished run-1 was refused)
            "finished": self.epoch >= self.cfg.train.epochs,
            "next_step": next_step,
            "run": self.link.run or self.run_id,
            "steps_done": self.steps_done,
            "epoch_losses": list(self.epoch_losses),
            "rng": rng_state(),
            **self.runner.activation.state(),
            "runner": self.runner.extra_state(),
            "dpsgd": self.runner.dp_state(),
            "resends": self.link.recorded.state(),  # for a relay that lost them (resends.py)
        }

    def _restore(self) -> int:
        found = self.ckpt.restore(self.cfg.client.run)
        if found is None:
            return 0
        state, path = found
        self.run_id = self.ckpt.resumed_in or self.run_id
        self._load_state(state)
        self.runner.restore_accounting(state)
        self.runner.load_extra_state(dict(state.get("runner", {})))
        self.link.recorded.load(state.get("resends"))  # sent before it, kept with it
        log.info("resumed from %s at epoch %d step %d", path, self.start[0] + 1, self.start[1])
        return self.steps_done

    def _load_state(self, state: dict[str, Any], rewind: bool = False) -> None:
        """Weights, optimizer, position, RNG and DP-SGD state from a checkpoint or undo point."""
        dp = check_dpsgd_kept(self.runner.private, dict(state.get("dpsgd", {})))
        for name, module in self.runner.modules.items():
            module.load_state_dict(state["modules"][name])
        self.runner.optimizer.load_state_dict(state["optimizer"])
        configured_momentum(self.runner.optimizer, self.cfg.train)  # not a compensated one
        self.epoch, self.steps_done = int(state["epoch"]), int(state["steps_done"])
        self.start = (self.epoch, int(state["next_step"]))
        self.last_applied = (self.epoch, self.start[1] - 1) if self.start[1] else None
        self.epoch_losses = [float(v) for v in state["epoch_losses"]]
        restore_rng(state["rng"])
        self.runner.load_dp_state(dp, rewind)

    def _save(self, next_step: int) -> None:
        if self.ckpt.due(self.steps_done):
            self.ckpt.save(self._state(next_step), self.steps_done)
            self.metrics.checkpoints_total.inc()

    def _save_at_end(self) -> Path | None:
        if not self.stopped:
            self.epoch = self.cfg.train.epochs  # finished: a restart has nothing left to do
        last = self.last_applied
        next_step = last[1] + 1 if self.stopped and last and last[0] == self.epoch else 0
        saved = self.ckpt.at_end(self.stopped, self.steps_done, lambda: self._state(next_step))
        self.metrics.checkpoints_total.inc(int(saved is not None))
        return saved

    # ---- connection --------------------------------------------------------------------
    @property
    def ctx(self) -> zmq.asyncio.Context | None:
        return self.link.ctx

    @ctx.setter
    def ctx(self, ctx: zmq.asyncio.Context | None) -> None:
        self.link.ctx = ctx

    @property
    def conn(self) -> DealerConnection | None:
        return self.link.conn

    @property
    def handshake(self) -> ClientHandshake:
        return self.link.handshake

    @property
    def retries(self) -> int:
        """Rejoins and resent requests so far (the link counts them)."""
        return self.link.retries

    async def connect(self) -> None:
        """Join the next hop (retrying); send again the steps a relay lost there."""
        await rejoined(self.link, self._join, lambda: self.last_applied)

    async def _join(self) -> None:
        welcome = checked_welcome(
            await self.link.connect(
                lambda: self.link.hello(self.start, self.last_applied), lambda: self.steps_done > 0
            )
        )
        if self.start[0] < self.cfg.train.epochs:  # else it trained its run: that one's
            joined = welcome.get("run") or self.run_id
            if self.last_applied is not None and not self.ckpt.resumed_in:  # a rejoin
                check_same_run(self.run_id, joined)
            self.run_id = joined
            self.ckpt.check_joined(self.run_id)
        where = (self.link.peer, self.cfg.client.server, self.run_id or "not chosen yet")
        log.info("joined %s %s (run %s, cipher %s)", *where, welcome.get("cipher", "none"))
        depth = self.cfg.train.pipeline_depth or MAX_DEPTH
        self.undo.after_join(welcome, self.last_applied, depth, self.link.peer)

    async def request(self, message: Message, timeout_s: float | None = None) -> Message:
        """Send and wait for the reply, rejoining and resending after a lost peer; a wait
        for other parties (a fixed one) within ``client.wait_for_parties_s``."""
        asked = self.link.request(message, self.connect, timeout_s)
        fixed = self.link.fixed_wait(timeout_s) is not None  # it waits for other parties
        return await for_parties(asked, fixed, self.cfg.client, self.topology, message)

    def message(self, kind: Kind, step: int = 0, **kwargs: Any) -> Message:
        msg = Message(kind=kind, client=self.cfg.client.name, epoch=self.epoch, step=step, **kwargs)
        return self.undo.marked(msg)  # a redone step says so (meta redo)

    # ---- training ----------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        start, wall = time.perf_counter(), None  # wall: the run's, without the final linger
        if (save := model_path(self.cfg, self.base)) is not None:
            check_writable(Path(save), "client.save")  # now, not after hours of training
        self.link.ctx = ctx = zmq.asyncio.Context()
        (ops_cfg, token), ready = ops_tokens(self.cfg.ops, self.base), (lambda: self.link.connected)
        ops = await start_ops(ops_cfg, self.metrics, self.status, ready, None, token)
        install_stop_signals(self.stop)
        try:
            try:
                await self.connect()
                resumed_at = self.start if self.last_applied else None
                check_replayable(self.runner.private, self.link.welcome, resumed_at)
                if self.pending is not None:
                    await self.align()
                await self.train()
            except Stopped:
                self.stopped = True
            except TransportError:  # gone for good (exit 5): keep what a stop keeps, so
                self.stopped = bool(self.steps_done)  # the same command carries on
                if self.stopped and (saved := self._save_at_end()) is not None:
                    log.warning("state saved in %s: the same command resumes here", saved)
                raise
            except PeerError as exc:  # a refused step: what this client's own state explains
                raise self.ckpt.explain(exc, self.link.run or self.run_id) from None
            if self.link.connected:  # a peer being rejoined is gone: no bye for it
                assert self.link.conn is not None
                bye = {"finished": not self.stopped, "accuracy": self.last_accuracy}
                await self.link.conn.send(self.message(Kind.BYE, meta=bye))
            if self.steps_done > self.resumed_from:  # else the saved model stays as it was
                self.runner.save()
            saved, run = self._save_at_end(), self.link.run or self.run_id
            if self.stopped and self.resumable:
                log_stop(self.epoch, self.step, saved, self.steps_done, run)
            wall = time.perf_counter() - start
            if not self.stopped:
                await self._linger(ops)
        finally:
            if ops is not None:
                await ops.stop()
            self.link.close(BYE_LINGER_MS)  # else the bye can be dropped: the name stays taken
            ctx.term()
            self.ckpt.release()
        return self.summary(wall if wall is not None else time.perf_counter() - start)

    async def _linger(self, ops: OpsServer | None) -> None:
        """Finished: keep serving /metrics until one scrape after the finish (at most
        ``ops.linger_s``, or until a stop signal), so that even a run shorter than the scrape
        interval leaves its final figures, and ``sl_finished = 1``, in Prometheus."""
        self.metrics.finished.set(1)
        wait_s = self.cfg.ops.linger_s
        if ops is None or wait_s <= 0:
            return
        log.info("finished; serving the final metrics until the next scrape (at most %gs)", wait_s)
        if await ops.linger(wait_s, self.stop) is False:
            log.info("no scrape within ops.linger_s = %gs; exiting", wait_s)

    async def train(self) -> None:
        """Every epoch from ``self.start``; after a rewind, again from the undo point."""
        self.undo.record(self.last_applied or NOTHING, lambda: self._state(self.start[1]))
        while True:
            try:
                return await self._train_from_start()
            except Rewind as rewind:
                self._load_state(rewind.state, rewind=True)
                self.ckpt.discard_after(self.steps_done)  # newer ones: another timeline now

    async def _train_from_start(self) -> None:
        for epoch in range(self.start[0], self.cfg.train.epochs):
            self.epoch = epoch
            self.metrics.epoch.set(epoch + 1)  # 1-based, as in the logs
            await self.runner.before_epoch(epoch)
            self.last_loss = await self._train_epoch(
                epoch, self.start[1] if epoch == self.start[0] else 0
            )
            await self.runner.after_epoch(epoch)
            await self._evaluate()
            self.history.append((epoch + 1, self.last_accuracy, self.last_loss))
            log.info(
                "epoch %d: train loss %.4f, test accuracy %s",
                epoch + 1,
                self.last_loss,
                "n/a (no labels here)"
                if self.last_accuracy is None
                else f"{self.last_accuracy:.4f}",
            )
        if await self.runner.after_training():
            await self._evaluate()

    async def _evaluate(self) -> None:
        self.last_accuracy = await self.runner.evaluate(self.data.test)
        if self.last_accuracy is not None:
            self.metrics.test_accuracy.set(self.last_accuracy)

    def summary(self, wall: float) -> dict[str, Any]:
        return client_summary(self, wall)

    def status(self) -> dict[str, Any]:
        return {
            "role": "client",
            "name": self.cfg.client.name,
            "topology": self.topology,
            "epoch": self.epoch,
            "step": self.steps_done,  # as sl_step: every applied step so far
            "epoch_step": self.step,
            "last_loss": self.last_loss,
            "last_accuracy": self.last_accuracy,
            "privacy": self.runner.report(),
        }

    async def _train_epoch(self, epoch: int, first_step: int = 0) -> float:
        """One epoch's batches in their fixed order, from ``first_step`` after a resume."""
        total = -(-len(self.data.train) // self.cfg.train.batch_size)
        if first_step == 0:
            self.epoch_losses = []
        bar = tqdm(
            total=total,
            initial=first_step,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            desc=f"{self.cfg.client.name} epoch {epoch + 1}/{self.cfg.train.epochs}",
            disable=not self.progress,
        )
        batches = self._batches(epoch, first_step)
        if self.cfg.train.pipeline_depth != 1:
            pipeline = Pipeline(self)
            async for applied in pipeline.run(epoch, batches):
                self._done(epoch, applied.step, applied.loss, applied.started, bar)
            depth = pipeline.depth
            # auto chooses once per run: later epochs keep the depth it picked
            self.cfg = replace(self.cfg, train=replace(self.cfg.train, pipeline_depth=depth))
        else:
            for step, x, y, ids in batches:
                started = time.perf_counter()
                loss = await self.runner.train_step(step, x, y, ids)
                self._done(epoch, step, loss, started, bar)
        bar.close()
        mean = float(sum(self.epoch_losses) / max(1, len(self.epoch_losses)))
        self.metrics.train_loss.set(mean)
        return mean

    def _batches(self, epoch: int, first_step: int) -> Iterator[tuple[int, Any, Any, Any]]:
        """This epoch's batches from ``first_step``; stops between steps on SIGTERM/SIGINT,
        before the next batch is drawn (a random draw would be lost to the checkpoint)."""
        batches = self.runner.epoch_batches(epoch, first_step)
        while not self.stop.is_set():
            item = next(batches, None)
            if item is None:
                return
            self.step = item[0]  # the step under way (with pipelining: the newest sent)
            yield item
        raise _Stopped

    def _done(self, epoch: int, step: int, loss: float, started: float, bar: Any) -> None:
        """Bookkeeping after a step's gradient is applied: counters, metrics, checkpoint."""
        self.metrics.step_rtt_seconds.observe(time.perf_counter() - started)
        self.steps_done += 1
        self.last_applied = (epoch, step)
        self.metrics.record_step(self.steps_done)
        self.epoch_losses.append(loss)
        self._save(step + 1)
        self.undo.record((epoch, step), lambda: self._state(step + 1))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    @property
    def bottom(self) -> torch.nn.Module:
        return self.runner.bottom
