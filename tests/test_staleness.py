"""Staleness compensation: a pipelined client with less momentum the deeper it runs.

The real :class:`~workers.client.microbatch.Pipeline` drives a client segment (one linear
layer, weight stashing as in production) against an in-process "server" that answers each
forward with the gradient of ``0.5 * |act|^2 / batch``: a quadratic whose minimum is at zero
weights. With 8 steps in flight, the configured momentum 0.9 plus the implicit momentum of
7 steps of staleness overshoots and diverges; with compensation it converges, as depth 1 does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from sl_pipeline.config import ClientConfig, LimitsConfig, TrainConfig, load
from sl_pipeline.messages import Kind, Message
from workers.client.microbatch import MAX_DEPTH, DepthProbe, Pipeline
from workers.client.staleness import MomentumCompensation, compensated_momentum
from workers.client.steps import StepRunner
from workers.client.worker import ClientWorker
from workers.runtime.resends import RecordedSteps
from workers.server.replycache import ReplyCache
from workers.tools.localdeploy import init_deployment

DIM, STEPS, LR = 4, 150, 0.2  # curvature 1/DIM per direction: lr * curvature = 0.05


class ToyRunner(StepRunner):
    """The production stash/apply code on a bare linear segment, with no host or defenses."""

    def __init__(self, train: TrainConfig) -> None:  # no base init: no worker behind it
        torch.manual_seed(0)
        self.modules = {"bottom": nn.Linear(DIM, DIM, bias=False)}
        self.device = torch.device("cpu")
        self.nopeek, self.dp, self.watch = None, None, None  # no hijack detector
        self.defense = SimpleNamespace(apply=lambda act: act)
        self.optimizer = torch.optim.SGD(
            self.bottom.parameters(), lr=train.lr, momentum=train.momentum
        )

    def forward_message(self, step: int, sent: Any, y: Any, ids: Any) -> Message:
        return Message(kind=Kind.FORWARD, step=step, tensors={"act": sent.detach()})


class QuadraticServer:
    """The other end of the link: each forward answered, in order, with its cut gradient."""

    def __init__(self) -> None:
        self.replies: deque[Message] = deque()

    async def send(self, msg: Message) -> None:
        act = msg.tensors["act"]
        self.replies.append(msg.reply(Kind.BACKWARD, tensors={"grad": act / act.shape[0]}))

    async def recv(self, timeout: float) -> Message:
        return self.replies.popleft()


def train(depth: int, compensate: bool) -> tuple[float, list[float]]:
    """|W| after STEPS steps at ``depth``, and the momentum seen at each applied step."""
    cfg = TrainConfig(lr=LR, momentum=0.9, pipeline_depth=depth, staleness_compensation=compensate)
    runner = ToyRunner(cfg)
    timer = SimpleNamespace(timeout=lambda kind: 1.0, sample=lambda kind, s: None)
    host = SimpleNamespace(
        cfg=SimpleNamespace(
            train=cfg, limits=LimitsConfig(), client=SimpleNamespace(retry_for_s=60)
        ),
        topology="vanilla",
        runner=runner,
        link=SimpleNamespace(
            conn=QuadraticServer(),
            timer=timer,
            reply_unless_stopped=lambda conn, wait: conn.recv(wait),
            recorded=RecordedSteps(),
        ),
    )
    x = torch.eye(DIM)
    batches = ((s, x, None, torch.arange(DIM)) for s in range(STEPS))
    seen: list[float] = []

    async def run() -> None:
        async for _ in Pipeline(host).run(0, batches):  # type: ignore[arg-type]
            seen.append(runner.optimizer.param_groups[0]["momentum"])

    asyncio.run(run())
    assert runner.optimizer.param_groups[0]["momentum"] == 0.9  # the configured value is back
    return float(runner.bottom.weight.detach().norm()), seen


def test_depth_8_diverges_with_the_configured_momentum_and_converges_compensated() -> None:
    start = float(ToyRunner(TrainConfig()).bottom.weight.detach().norm())
    at_1, _ = train(1, compensate=True)
    stale, _ = train(8, compensate=False)
    compensated, momenta = train(8, compensate=True)
    assert at_1 < 1e-3 * start  # the problem itself is easy at depth 1
    assert stale > 10 * start  # 7 steps stale on top of momentum 0.9: it blows up
    assert compensated < 1e-3 * start
    assert momenta == [pytest.approx(compensated_momentum(0.9, 8))] * STEPS


@pytest.mark.parametrize(
    ("momentum", "depth", "expected"),
    [(0.9, 1, 0.9), (0.9, 2, 0.4), (0.9, 4, 0.15), (0.9, 8, 0.025), (0.9, 16, 0.0), (0.5, 2, 0.0)],
)
def test_compensated_momentum_takes_off_the_implicit_part(
    momentum: float, depth: int, expected: float
) -> None:
    assert compensated_momentum(momentum, depth) == pytest.approx(expected)


def test_the_server_keeps_a_reply_for_every_step_the_deepest_pipeline_has_in_flight() -> None:
    # a rejoining client resends all its steps in flight; each must be answered from the cache
    assert ReplyCache().depth >= MAX_DEPTH


def test_auto_doubles_the_depth_while_latency_stays_flat_and_undoes_the_one_that_queues() -> None:
    probe = DepthProbe(round_trip_s=0.040)
    for _ in range(5):  # depth 1: 53 ms a step, 3 ms of it this client's
        probe.record(0.053, 0.003)
    assert probe.depth == 6  # 53 / (53 - 40 - 3) -> 6
    for _ in range(12):
        probe.record(0.054, 0.003)
    assert (probe.depth, probe.done) == (12, False)  # no queueing at 6: double
    for _ in range(24):
        probe.record(0.055, 0.003)
    assert (probe.depth, probe.done) == (16, False)  # at most 16
    for _ in range(32):
        probe.record(0.090, 0.003)  # steps now wait for a busy party
    assert (probe.depth, probe.done) == (12, True)


def test_a_client_resumed_from_a_checkpoint_taken_while_compensating_has_its_momentum(
    tmp_path: Path,
) -> None:
    # Prepare: a client whose checkpoint was saved mid pipelined run, at depth 8's momentum
    made = init_deployment(tmp_path, topology="vanilla", dataset="breast_cancer", insecure=True)
    ckpt = f'checkpoint.dir="{tmp_path / "ckpt"}"'
    cfg = load(ClientConfig, Path(made["files"]["client-1"]), [ckpt])
    first = ClientWorker(cfg, tmp_path, progress=False)
    MomentumCompensation(first.runner.optimizer, cfg.train).set_depth(8)
    assert first.runner.optimizer.param_groups[0]["momentum"] < cfg.train.momentum
    first.steps_done = 3
    first.ckpt.save(first._state(3), first.steps_done)
    # Execute: it restarts (at depth 1, as configured) from that checkpoint
    resumed = ClientWorker(cfg, tmp_path, progress=False)
    # Assert: the configured momentum, not the lowered one it would keep for good
    assert resumed.resumed_from == 3
    assert [g["momentum"] for g in resumed.runner.optimizer.param_groups] == [
        cfg.train.momentum
    ] * len(resumed.runner.optimizer.param_groups)
