"""Micro-batch pipelining on the client: compute batch k+1 while the server works on k.

Off by default (``train.pipeline_depth = 1``). With depth d, up to d steps are in flight.
``pipeline_depth = 0`` (``--pipeline-depth auto``) measures the round trip (heartbeats) and
the first steps at depth 1, then keeps the slower party busy (:func:`auto_depth`).
Each step's forward runs on a *stash* of the client segment's weights (PipeDream-style weight
stashing), so when its gradient comes back the backward pass runs through exactly the weights
that produced the activations, and the resulting gradient is applied to the current weights:
the client's update is stale by up to d-1 steps, bounded, and its momentum is lowered by the
implicit momentum that staleness adds (:mod:`workers.client.staleness`). The server applies
steps in order as before; its reply cache answers a resend of any step still in flight after
a rejoin.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sl_pipeline.config import MAX_PIPELINE_DEPTH, ClientConfig
from sl_pipeline.errors import ConfigError, PeerError, ReplyTimeoutError, TransportError
from sl_pipeline.messages import Kind, Message, check_answers
from workers.client.link import Unanswered, Upstream
from workers.client.patience import WAIT_CODES
from workers.client.replies import reply_loss, reply_tensor
from workers.client.staleness import MomentumCompensation
from workers.client.steps import StepRunner


class PipelineHost(Protocol):
    """What pipelining uses of the client worker: its connection, reply timer and runner."""

    cfg: ClientConfig
    topology: str
    runner: StepRunner
    link: Upstream

    async def connect(self) -> None: ...

    async def request(self, message: Message, timeout_s: float | None = None) -> Message: ...


log = logging.getLogger("workers.client")

# Deeper than 16 costs more than a point of digits accuracy even with staleness compensation
# (depth 32: 0.9610 against 0.9742 at depth 1, mean of 8 seeds; 16: 0.9669; docs/performance.md)
MAX_DEPTH = MAX_PIPELINE_DEPTH
MAX_REJOINS = 100
AUTO = 0  # train.pipeline_depth = 0: chosen from the measured round trip and step time
AUTO_MAX_DEPTH = MAX_DEPTH  # staleness compensation keeps depth 16 within a point of depth 1
PROBE_PINGS = 3
PROBE_STEPS = 5
GROW_SLACK = 1.2  # auto doubles the depth while a step takes at most this x depth 1's time


@dataclass
class InFlight:
    step: int
    x: torch.Tensor
    act: torch.Tensor
    sent: torch.Tensor
    stash: dict[str, torch.Tensor]
    msg: Message
    started: float
    client_s: float  # this client's own compute for the step so far
    y: torch.Tensor | None = None  # its labels, for the hijack detector


@dataclass
class DepthProbe:
    """``--pipeline-depth auto``: times the first steps at depth 1 and picks a depth from
    them (:func:`auto_depth`), then doubles it while a step's latency stays within
    :data:`GROW_SLACK` of depth 1's: a latency that does not grow means nothing queues, so
    the link's latency, not a busy party, limits the steps/s, and more in flight means more
    steps/s. The first doubling that queues is undone."""

    round_trip_s: float
    steps_s: list[float] = field(default_factory=list)
    client_s: list[float] = field(default_factory=list)
    depth: int = 1  # the depth to use now
    previous: int = 0  # the depth before the last doubling (0: none yet)
    window: list[float] = field(default_factory=list)  # latencies since ``depth`` was set
    done: bool = False

    @property
    def chosen(self) -> bool:
        return len(self.steps_s) >= PROBE_STEPS

    def record(self, step_s: float, client_s: float) -> None:
        """One applied step: its latency, and this client's compute in it."""
        if not self.chosen:
            self.steps_s.append(step_s)
            self.client_s.append(client_s)
            if self.chosen:
                self.depth = self.choose()
            return
        self.window.append(step_s)
        if len(self.window) >= 2 * self.depth:  # the first half was sent at the old depth
            self._grow(statistics.median(self.window[self.depth :]))

    def _grow(self, latency_s: float) -> None:
        base_s = statistics.median(self.steps_s)
        self.window = []
        if latency_s > GROW_SLACK * base_s:  # steps queue: a party is busy, more won't help
            self.depth, self.done = self.previous or self.depth, True
        elif self.depth >= AUTO_MAX_DEPTH:
            self.done = True
        else:
            self.previous, self.depth = self.depth, min(AUTO_MAX_DEPTH, 2 * self.depth)
        log.info(
            "pipeline depth auto: %s %d (latency %.1f ms, %.1f ms at depth 1)",
            "settled at" if self.done else "grew to",
            self.depth,
            latency_s * 1e3,
            base_s * 1e3,
        )

    def choose(self) -> int:
        step_s, client_s = statistics.median(self.steps_s), statistics.median(self.client_s)
        depth = auto_depth(step_s, self.round_trip_s, client_s)
        log.info(
            "pipeline depth auto: %d (round trip %.1f ms, step at depth 1 %.1f ms, "
            "client compute %.1f ms)",
            depth,
            self.round_trip_s * 1e3,
            step_s * 1e3,
            client_s * 1e3,
        )
        return depth


def auto_depth(step_s: float, round_trip_s: float, client_s: float) -> int:
    """Steps in flight that keep the slower party busy. At depth 1 a step takes ``step_s`` =
    round trip + client compute + server compute; the slower party finishes a step every
    ``max(client, server)`` seconds, so ``step_s`` over that many steps must be in flight
    (at most :data:`AUTO_MAX_DEPTH`)."""
    server_s = max(step_s - round_trip_s - client_s, 0.0)
    busy_s = max(client_s, server_s, 1e-4)
    return max(1, min(AUTO_MAX_DEPTH, math.ceil(step_s / busy_s)))


async def measure_round_trip(worker: PipelineHost) -> float:
    """Median of a few heartbeat round trips to the server (or relay), which answers each."""
    samples = []
    for _ in range(PROBE_PINGS):
        start = time.perf_counter()
        await worker.request(Message(kind=Kind.HEARTBEAT, client=worker.cfg.client.name))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def check_depth(worker: PipelineHost) -> int:
    depth = worker.cfg.train.pipeline_depth
    if not 0 <= depth <= MAX_DEPTH:
        raise ConfigError(
            f"train.pipeline_depth = {depth} must be between 1 and {MAX_DEPTH}, or 0 (auto)"
        )
    if depth == AUTO and not worker.runner.pipelines:
        return 1  # auto: this topology cannot pipeline, so one step at a time
    if depth > 1 and worker.runner.dp is not None:
        raise ConfigError(
            f"train.pipeline_depth = {depth} with privacy.dpsgd: pipelining runs each forward "
            "on a stashed copy of the weights, which Opacus' per-example gradients do not "
            "see; set train.pipeline_depth = 1"
        )
    if depth > 1 and not worker.runner.pipelines:
        raise ConfigError(
            f"train.pipeline_depth > 1 is not available for topology {worker.topology!r}; "
            "set it to 1"
        )
    return depth


async def _reply(worker: PipelineHost, inflight: deque[InFlight]) -> Message:
    """The oldest step's reply; after a lost server or a wait that ran out (the adaptive
    timer, as for single requests), rejoin and resend every step in flight. A stop signal
    ends the wait at once (``Stopped``), as it does a single request's."""
    unanswered = Unanswered(worker.cfg.client.retry_for_s, f"the {len(inflight)} steps in flight")
    for attempt in range(MAX_REJOINS):
        assert worker.link.conn is not None
        try:
            wait = worker.link.timer.timeout("forward")
            reply = await worker.link.reply_unless_stopped(worker.link.conn, wait)
        except (TransportError, PeerError) as exc:
            if isinstance(exc, PeerError) and not exc.retryable:
                raise
            if isinstance(exc, ReplyTimeoutError):
                worker.link.timer.expired("forward")
            if isinstance(exc, PeerError) and exc.remote_code in WAIT_CODES:
                await worker.link.wait_out(exc)  # bounded in time and count
            else:
                worker.link.lost(exc)
                unanswered.failed(exc)
            await worker.connect()
            for item in inflight:
                await worker.link.conn.send(item.msg)
            continue
        if attempt == 0:  # the round trip of the oldest step, from when it was sent
            worker.link.timer.sample("forward", time.perf_counter() - inflight[0].started)
        return reply
    raise TransportError(f"gave up after {MAX_REJOINS} rejoins with steps in flight")


@dataclass(frozen=True)
class Applied:
    """A step whose gradient came back and was applied: what the worker books for it."""

    step: int
    loss: float
    started: float  # when its forward began (``time.perf_counter``)


class Pipeline:
    """Up to ``depth`` steps in flight over the host's link. :meth:`run` yields each step
    as its gradient is applied; the caller does the bookkeeping (counters, checkpoints)."""

    def __init__(self, host: PipelineHost) -> None:
        self.host = host
        self.depth = check_depth(host)  # with auto: the depth chosen, once there is one

    async def run(
        self, epoch: int, batches: Iterator[tuple[int, Any, Any, Any]]
    ) -> AsyncIterator[Applied]:
        runner, link = self.host.runner, self.host.link
        inflight: deque[InFlight] = deque()
        probe = DepthProbe(await measure_round_trip(self.host)) if self.depth == AUTO else None
        depth = 1 if probe is not None else self.depth
        momentum = MomentumCompensation(runner.optimizer, self.host.cfg.train)
        momentum.set_depth(depth)
        try:
            for step, x, y, ids in batches:
                started = time.perf_counter()
                act, sent, stash = runner.stash_forward(x)
                msg = runner.forward_message(step, sent, y, ids)
                assert link.conn is not None
                client_s = time.perf_counter() - started
                link.recorded.record(msg)
                await link.conn.send(msg)
                inflight.append(InFlight(step, x, act, sent, stash, msg, started, client_s, y))
                while len(inflight) >= depth:  # more than one after auto lowered the depth
                    yield await self._complete(epoch, inflight, probe)
                    if probe is not None:
                        depth = probe.depth
                        momentum.set_depth(depth)
                        probe = None if probe.done else probe
            while inflight:
                yield await self._complete(epoch, inflight, probe)
        finally:
            momentum.restore()  # the configured momentum for whatever runs next
        # auto: too few steps to choose, so choose next time; or keep the depth it reached
        self.depth = AUTO if probe is not None and not probe.chosen else depth

    async def _complete(
        self, epoch: int, inflight: deque[InFlight], probe: DepthProbe | None
    ) -> Applied:
        """The oldest step's reply, its gradient applied through the stashed weights."""
        reply = await _reply(self.host, inflight)
        item = inflight.popleft()
        check_answers(item.msg, reply)  # replies come in order: the oldest step's first
        start = time.perf_counter()
        max_abs = self.host.cfg.limits.max_abs_value
        grad = reply_tensor(reply, Kind.BACKWARD, "grad", max_abs, item.sent.shape)
        loss = reply_loss(reply)  # all of the reply checked before any of it is applied
        self.host.runner.scrutinize(grad, item.y, item.sent)  # the hijack detector, if on
        self.host.runner.apply_stashed(item.x, item.act, item.sent, item.stash, grad)
        end = time.perf_counter()
        if probe is not None:
            probe.record(end - item.started, item.client_s + end - start)
        return Applied(item.step, loss, item.started)


async def train_pipelined(
    worker: PipelineHost,
    epoch: int,
    batches: Iterator[tuple[int, Any, Any, Any]],
    done: Callable[[int, float, float], None],
) -> int:
    """:class:`Pipeline` for a caller that books each step through ``done`` (the benches);
    returns the depth used (with ``auto``, the one it chose, or AUTO for too few steps)."""
    pipeline = Pipeline(worker)
    async for applied in pipeline.run(epoch, batches):
        done(applied.step, applied.loss, applied.started)
    return pipeline.depth
