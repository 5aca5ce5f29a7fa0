"""Micro-batch pipelining on the client: compute batch k+1 while the server works on k.

Off by default (``train.pipeline_depth = 1``). With depth d, up to d steps are in flight.
Each step's forward runs on a *stash* of the client segment's weights (PipeDream-style weight
stashing), so when its gradient comes back the backward pass runs through exactly the weights
that produced the activations, and the resulting gradient is applied to the current weights:
the client's update is stale by up to d-1 steps, bounded. The server applies steps in order
as before; its reply cache answers a resend of any step still in flight after a rejoin.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sl_pipeline.errors import ConfigError, PeerError, ReplyTimeoutError, TransportError
from sl_pipeline.messages import Message
from sl_pipeline.tensors import read_tensor

if TYPE_CHECKING:
    from workers.client.worker import ClientWorker

MAX_DEPTH = 8
MAX_REJOINS = 100


@dataclass
class InFlight:
    step: int
    x: torch.Tensor
    act: torch.Tensor
    sent: torch.Tensor
    stash: dict[str, torch.Tensor]
    msg: Message
    started: float


def check_depth(worker: ClientWorker) -> int:
    depth = worker.cfg.train.pipeline_depth
    if not 1 <= depth <= MAX_DEPTH:
        raise ConfigError(f"train.pipeline_depth = {depth} must be between 1 and {MAX_DEPTH}")
    if depth > 1 and not worker.runner.pipelines:
        raise ConfigError(
            f"train.pipeline_depth > 1 is not available for topology {worker.topology!r} "
            "or with DP-SGD; set it to 1"
        )
    return depth


async def _reply(worker: ClientWorker, inflight: deque[InFlight]) -> Message:
    """The oldest step's reply; after a lost server or a wait that ran out (the adaptive
    timer, as for single requests), rejoin and resend every step in flight."""
    for attempt in range(MAX_REJOINS):
        assert worker.conn is not None
        try:
            reply = await worker.conn.recv(worker.timer.timeout("forward"))
        except (TransportError, PeerError) as exc:
            if isinstance(exc, PeerError) and not exc.retryable:
                raise
            if isinstance(exc, ReplyTimeoutError):
                worker.timer.expired("forward")
            worker.lost_upstream(exc)
            await worker.connect()
            for item in inflight:
                await worker.conn.send(item.msg)
            continue
        if attempt == 0:  # the round trip of the oldest step, from when it was sent
            worker.timer.sample("forward", time.perf_counter() - inflight[0].started)
        return reply
    raise TransportError(f"gave up after {MAX_REJOINS} rejoins with steps in flight")


async def train_pipelined(
    worker: ClientWorker,
    epoch: int,
    batches: Iterator[tuple[int, Any, Any, Any]],
    done: Callable[[int, float, float], None],
) -> None:
    depth = check_depth(worker)
    runner = worker.runner
    inflight: deque[InFlight] = deque()

    async def complete_oldest() -> None:
        reply = await _reply(worker, inflight)
        item = inflight.popleft()
        if (reply.epoch, reply.step) != (epoch, item.step):
            raise TransportError(f"reply for step {reply.step} while waiting for {item.step}")
        runner.apply_stashed(item.x, item.act, item.sent, item.stash, read_tensor(reply, "grad"))
        done(item.step, float(reply.meta.get("loss", float("nan"))), item.started)

    for step, x, y, ids in batches:
        worker.step = step
        started = time.perf_counter()
        act, sent, stash = runner.stash_forward(x)
        msg = runner.forward_message(step, sent, y, ids)
        assert worker.conn is not None
        await worker.conn.send(msg)
        inflight.append(InFlight(step, x, act, sent, stash, msg, started))
        if len(inflight) >= depth:
            await complete_oldest()
    while inflight:
        await complete_oldest()
