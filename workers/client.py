"""The client worker: holds the data and the first layers, drives the training.

For each batch it runs its segment to the cut layer, sends the activations (and, in the
vanilla topology, the labels), waits for the gradient at the cut and finishes
backpropagation locally. After each epoch it evaluates on its own test split.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import zmq.asyncio
from tqdm import tqdm

from sl_pipeline.config import ClientConfig, check_endpoint
from sl_pipeline.data import PartyData, batch_order, iter_batches, load_party_data
from sl_pipeline.errors import ConfigError, PeerError, SLError, TransportError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.models import build_segments, fingerprint, make_optimizer
from sl_pipeline.transport import DealerConnection

from .common import load_own_key, load_peer_key, start_ops, warn_insecure
from .engine import as_input, wire
from .metrics import WorkerMetrics

log = logging.getLogger("sl_pipeline.client")


class ClientWorker:
    def __init__(
        self,
        cfg: ClientConfig,
        base: Path,
        metrics: WorkerMetrics | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.base = base
        self.metrics = metrics or WorkerMetrics("client")
        self.progress = progress
        self.topology = self._topology()
        check_endpoint(cfg.client.server, "client.server")
        self.data: PartyData = load_party_data(cfg.data, base, cfg.model.classes)
        segments = build_segments(cfg.model, self.topology)
        self.bottom = segments[0]
        self.head = segments[2] if self.topology == "ushaped" else None
        params = list(self.bottom.parameters())
        if self.head is not None:
            params += list(self.head.parameters())
        t = cfg.train
        self.optimizer = make_optimizer(params, t.optimizer, t.lr, t.momentum)
        self.handshake = self._make_handshake()
        self.conn: DealerConnection | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.epoch = 0
        self.step = 0
        self.steps_done = 0
        self.retries = 0
        self.last_loss: float | None = None
        self.last_accuracy: float | None = None
        self.bytes = {"sent": 0, "received": 0}

    def _topology(self) -> str:
        model = self.cfg.model
        if model.cuts and len(model.cuts) == 2 and model.builtin:
            return "ushaped"
        return "vanilla"

    def _make_handshake(self) -> ClientHandshake:
        c = self.cfg.client
        hello = {
            "v": PROTOCOL_VERSION,
            "client": c.name,
            "model": fingerprint(self.cfg.model, self.topology),
            "role": c.role,
        }
        if c.insecure:
            warn_insecure("client")
            return ClientHandshake(hello, None, None)
        static = load_own_key(self.base, c.key, "client.key")
        server_key = load_peer_key(self.base, c.server_key, "client.server_key")
        return ClientHandshake(hello, static, server_key)

    # ---- connection --------------------------------------------------------------------
    def _count(self, direction: str, kind: str, nbytes: int) -> None:
        self.bytes[direction] += nbytes
        self.metrics.record_message(direction, kind, nbytes)

    async def connect(self) -> None:
        """Handshake, retrying with capped exponential backoff and jitter."""
        c = self.cfg.client
        deadline = time.monotonic() + c.retry_for_s
        delay = 0.2
        assert self.ctx is not None
        while True:
            if self.conn is not None:
                self.conn.close()
            self.conn = DealerConnection(self.ctx, c.server, self.cfg.limits.to_limits(), self._count)
            try:
                await self.conn.handshake(self.handshake, c.connect_timeout_s)
                log.info("joined server %s", c.server)
                return
            except TransportError:
                if time.monotonic() + delay > deadline:
                    error = ConfigError if self.steps_done == 0 else TransportError
                    raise error(
                        f"client.server = {c.server!r}: no server answered for "
                        f"{c.retry_for_s:.0f}s; check that it runs and that the address is right"
                    ) from None
            self.retries += 1
            self.metrics.retries_total.inc()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def request(self, message: Message) -> Message:
        """Send and wait for the reply; on a lost server, rejoin and resend the same step."""
        for _ in range(100):
            assert self.conn is not None
            try:
                await self.conn.send(message)
                return await self.conn.recv(self.cfg.client.timeout_s)
            except (TransportError, PeerError) as exc:
                if isinstance(exc, PeerError) and not exc.retryable:
                    raise
                log.warning("lost the server (%s); rejoining", exc)
                self.retries += 1
                self.metrics.retries_total.inc()
                await self.connect()
        raise TransportError("gave up after 100 retries of one step")

    # ---- training ----------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.ctx = zmq.asyncio.Context()
        ops = await start_ops(self.cfg.ops, self.metrics, self.status, lambda: self.conn is not None)
        try:
            await self.connect()
            for epoch in range(self.cfg.train.epochs):
                self.epoch = epoch
                self.metrics.epoch.set(epoch)
                self.last_loss = await self._train_epoch(epoch)
                self.last_accuracy = await self.evaluate()
                self.metrics.test_accuracy.set(self.last_accuracy)
                log.info("epoch %d: train loss %.4f, test accuracy %.4f", epoch + 1, self.last_loss, self.last_accuracy)
            assert self.conn is not None
            await self.conn.send(Message(kind=Kind.BYE, client=self.cfg.client.name))
        finally:
            if ops is not None:
                await ops.stop()
            if self.conn is not None:
                self.conn.close()
            self.ctx.term()
        return self.summary(time.perf_counter() - start)

    def summary(self, wall: float) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "dataset": self.cfg.data.dataset or self.cfg.data.path,
            "client": self.cfg.client.name,
            "epochs": self.cfg.train.epochs,
            "steps": self.steps_done,
            "test_accuracy": self.last_accuracy,
            "test_samples": len(self.data.test),
            "train_loss": self.last_loss,
            "bytes_sent": self.bytes["sent"],
            "bytes_received": self.bytes["received"],
            "retries": self.retries,
            "wall_seconds": round(wall, 3),
        }

    def status(self) -> dict[str, Any]:
        return {
            "role": "client",
            "name": self.cfg.client.name,
            "topology": self.topology,
            "epoch": self.epoch,
            "step": self.step,
            "last_loss": self.last_loss,
            "last_accuracy": self.last_accuracy,
        }

    async def _train_epoch(self, epoch: int) -> float:
        train = self.data.train
        batches = batch_order(len(train), self.cfg.train.batch_size, self.cfg.train.seed, epoch)
        bar = tqdm(batches, desc=f"{self.cfg.client.name} epoch {epoch + 1}/{self.cfg.train.epochs}",
                   disable=not self.progress, file=sys.stderr, leave=False, dynamic_ncols=True)
        losses = []
        for step, idx in enumerate(bar):
            self.step = step
            x = train.x[idx]
            y = train.y[idx] if train.y is not None else None
            started = time.perf_counter()
            loss = await self.train_step(epoch, step, x, y)
            self.metrics.step_rtt_seconds.observe(time.perf_counter() - started)
            self.steps_done += 1
            self.metrics.record_step(self.steps_done)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        mean = float(sum(losses) / max(1, len(losses)))
        self.metrics.train_loss.set(mean)
        return mean

    async def train_step(self, epoch: int, step: int, x: torch.Tensor, y: torch.Tensor | None) -> float:
        self.bottom.train()
        act = self.bottom(x)
        tensors = {"act": wire(act, self.cfg.train.wire_dtype)}
        if self.head is None:
            if y is None:
                raise SLError("this client has no labels but the topology needs them")
            tensors["labels"] = y
        msg = Message(kind=Kind.FORWARD, client=self.cfg.client.name, epoch=epoch, step=step, tensors=tensors)
        reply = await self.request(msg)
        self.optimizer.zero_grad(set_to_none=True)
        if self.head is not None:
            loss_value, reply = await self._ushaped_tail(msg, reply, y)
        else:
            loss_value = float(reply.meta.get("loss", float("nan")))
        grad = as_input(reply.tensor("grad"), requires_grad=False)
        act.backward(grad)
        self.optimizer.step()
        return loss_value

    async def _ushaped_tail(self, msg: Message, reply: Message, y: torch.Tensor | None) -> tuple[float, Message]:
        assert self.head is not None and y is not None
        middle = as_input(reply.tensor("out"), requires_grad=True)
        loss = F.cross_entropy(self.head(middle), y)
        loss.backward()
        assert middle.grad is not None
        back = msg.reply(Kind.BACKWARD, tensors={"grad": wire(middle.grad, self.cfg.train.wire_dtype)})
        return float(loss.detach()), await self.request(back)

    async def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for ``x``: only cut-layer activations leave this party."""
        self.bottom.eval()
        with torch.no_grad():
            act = self.bottom(x)
        reply = await self.request(Message(kind=Kind.EVALUATE, client=self.cfg.client.name,
                                           epoch=self.epoch, tensors={"act": wire(act, self.cfg.train.wire_dtype)}))
        out = reply.tensor("out").to(torch.float32)
        if self.head is not None:
            self.head.eval()
            with torch.no_grad():
                out = self.head(out)
            self.head.train()
        self.bottom.train()
        return out

    async def evaluate(self) -> float:
        test = self.data.test
        correct = 0
        for x, y in iter_batches(test, 256):
            out = await self.logits(x)
            assert y is not None
            correct += int((out.argmax(dim=1) == y).sum())
        return correct / max(1, len(test))
