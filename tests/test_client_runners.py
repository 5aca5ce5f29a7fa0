"""The client's step runner of every topology, without a socket: the runner's ``request`` is
answered in-process by the topology's server engine (a relay's segment in between for
multi-hop), so one step can be checked message by message."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sl_pipeline.config import TOPOLOGIES, ClientConfig, RelayConfig, ServerConfig, load
from sl_pipeline.data import PartyData
from sl_pipeline.errors import ReplyMismatchError
from sl_pipeline.messages import Kind, Message, check_answers
from sl_pipeline.models import build_segments
from sl_pipeline.sources import load_source
from sl_pipeline.tensors import as_input, read_tensor, wire_tensors
from workers.client.align import first_data
from workers.client.host import RunnerConfig
from workers.client.link import Stopped, Upstream, make_handshake
from workers.client.microbatch import Pipeline
from workers.client.steps import StepRunner
from workers.ops.metrics import WorkerMetrics
from workers.server.engines.base import Engine
from workers.tools.localdeploy import init_deployment
from workers.topologies import topology

STEPS = 2
TIMEOUT_S = 60.0


class Hub:
    """The server's side of every exchange: messages in, each reply to whoever it is for."""

    def __init__(self, engine: Engine, hop: Any = None) -> None:
        self.engine = engine
        self.hop = hop  # multi-hop: the relay's segment between the client and the server
        self.waiting: dict[bytes, asyncio.Future[Message]] = {}
        self.sent: list[Message] = []

    async def request(self, identity: bytes, msg: Message) -> Message:
        self.sent.append(msg)
        answer = self.waiting[identity] = asyncio.get_running_loop().create_future()
        replies = self.hop(msg) if self.hop else self.engine.handle(identity, msg)
        for target, reply in replies:
            self.waiting.pop(target).set_result(reply)
        return await asyncio.wait_for(answer, TIMEOUT_S)


class Host:
    """What a runner sees of its worker (:class:`workers.client.host.RunnerHost`)."""

    def __init__(self, cfg: ClientConfig, base: Path, hub: Hub) -> None:
        self.cfg, self.base, self.hub = cfg, base, hub
        self.topology = cfg.client.topology
        self.metrics = WorkerMetrics("client")
        self.epoch, self.start, self.resumed_from = 0, (0, 0), 0
        m = cfg.model
        self.data: PartyData = first_data(
            cfg, load_source(cfg.data, base, m.classes, m.in_shape), aligned_later=False
        )

    async def request(self, message: Message, timeout_s: float | None = None) -> Message:
        # as the link does: every engine's reply must name the request it answers
        return check_answers(
            message, await self.hub.request(self.cfg.client.name.encode(), message)
        )

    def message(self, kind: Kind, step: int = 0, **kwargs: Any) -> Message:
        return Message(
            kind=kind, client=self.cfg.client.name, epoch=self.epoch, step=step, **kwargs
        )


def relay_hop(cfg: RelayConfig, engine: Engine) -> Any:
    """The relay's middle segment: forward through it to the engine, and its gradient back."""
    segment = build_segments(cfg.model, "multihop")[1]

    def hop(msg: Message) -> list[tuple[bytes, Message]]:
        act = as_input(read_tensor(msg, "act"), True)
        out = segment(act)
        tensors = {**wire_tensors("act", out, "float32"), "labels": msg.tensor("labels")}
        [(_, reply)] = engine.handle(b"relay-1", msg.follow(Kind.FORWARD, tensors=tensors))
        out.backward(read_tensor(reply, "grad"))
        assert act.grad is not None
        grad = wire_tensors("grad", act.grad, "float32")
        return [
            (msg.client.encode(), msg.reply(Kind.BACKWARD, meta=dict(reply.meta), tensors=grad))
        ]

    return hop


def deployment(tmp_path: Path, name: str, label_client: bool = False) -> tuple[list[Host], Hub]:
    spec = topology(name)
    dataset = spec.datasets[-1]  # breast cancer, the smaller one, where the topology runs on it
    clients = spec.default_clients
    made = init_deployment(
        tmp_path,
        topology=name,
        dataset=dataset,
        clients=clients,
        insecure=True,
        label_client=label_client,
    )
    files = {site: Path(path) for site, path in made["files"].items()}
    server = load(ServerConfig, files["server"])
    engine = topology(name).engine(server, tmp_path)
    hop = relay_hop(load(RelayConfig, files["relay-1"]), engine) if "relay-1" in files else None
    hub = Hub(engine, hop)
    position = ['data.align="position"'] if topology(name).aligns_rows else []
    clients = sorted(site for site in files if site.startswith("client-"))
    return [Host(load(ClientConfig, files[c], position), tmp_path, hub) for c in clients], hub


async def train(runner: StepRunner) -> list[float]:
    """What a client worker does in its first epoch, for ``STEPS`` steps."""
    await runner.before_epoch(0)
    losses = []
    for step, x, y, ids in itertools.islice(runner.epoch_batches(0), STEPS):
        losses.append(await runner.train_step(step, x, y, ids))
    await runner.after_epoch(0)
    return losses


def weights(runner: StepRunner) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(runner.bottom.parameters()).detach().clone()


@pytest.mark.parametrize(
    ("name", "label_client"),
    [*((name, False) for name in TOPOLOGIES), ("vertical", True)],
    ids=[*TOPOLOGIES, "vertical-label-client"],
)
async def test_a_runner_steps_against_its_engine_without_a_socket(
    tmp_path: Path, name: str, label_client: bool
) -> None:
    # Prepare
    hosts, hub = deployment(tmp_path, name, label_client)
    runners = [topology(name).runner(host, RunnerConfig.of(host.cfg)) for host in hosts]
    before = [weights(r) for r in runners]
    # Execute
    losses = await asyncio.wait_for(asyncio.gather(*(train(r) for r in runners)), TIMEOUT_S)
    # Assert: every runner applied the gradients it got back; the server stepped too
    forwards = [m for m in hub.sent if m.kind is Kind.FORWARD]
    assert len(forwards) == STEPS * len(runners)
    assert {m.client for m in forwards} == {h.cfg.client.name for h in hosts}
    assert all("act" in m.tensors for m in forwards)
    assert hub.engine.steps_applied >= STEPS
    for runner, old in zip(runners, before, strict=True):
        assert not torch.equal(weights(runner), old)
    # The loss is where the labels are: a client's (u-shaped, a label client) or the server's
    known = [loss for client in losses for loss in client if not math.isnan(loss)]
    if hub.engine.last_loss is not None:
        known.append(hub.engine.last_loss)
    assert known and all(loss > 0 for loss in known)


@pytest.mark.parametrize(("name", "labels_leave"), [("vanilla", True), ("ushaped", False)])
async def test_labels_leave_the_client_only_where_the_server_holds_the_loss(
    tmp_path: Path, name: str, labels_leave: bool
) -> None:
    hosts, hub = deployment(tmp_path, name)
    await asyncio.wait_for(
        train(topology(name).runner(hosts[0], RunnerConfig.of(hosts[0].cfg))), TIMEOUT_S
    )
    assert all(("labels" in m.tensors) == labels_leave for m in hub.sent)


class Conn:
    """A connection whose peer is the engine, in-process: replies queue until received."""

    def __init__(self, hub: Hub, identity: bytes) -> None:
        self.hub, self.identity = hub, identity
        self.replies: asyncio.Queue[Message] = asyncio.Queue()

    async def send(self, msg: Message) -> None:
        self.hub.sent.append(msg)
        for _, reply in self.hub.engine.handle(self.identity, msg):
            self.replies.put_nowait(reply)

    async def recv(self, timeout_s: float) -> Message:
        return await asyncio.wait_for(self.replies.get(), timeout_s)


async def test_pipelining_yields_each_applied_step_in_order_without_a_socket(
    tmp_path: Path,
) -> None:
    # Prepare: vanilla with three steps in flight, over a connection to the engine
    [host], hub = deployment(tmp_path, "vanilla")
    host.cfg = dataclasses.replace(
        host.cfg, train=dataclasses.replace(host.cfg.train, pipeline_depth=3)
    )
    host.runner = topology("vanilla").runner(host, RunnerConfig.of(host.cfg))
    host.link = Upstream(host.cfg, host.metrics, make_handshake(host.cfg, tmp_path, "vanilla"))
    host.link.conn = Conn(hub, b"client-1")  # type: ignore[assignment]
    before = weights(host.runner)
    batches = itertools.islice(host.runner.epoch_batches(0), 5)
    # Execute
    pipeline = Pipeline(host)  # type: ignore[arg-type]
    applied = [a async for a in pipeline.run(0, batches)]
    # Assert: every step came back once, in order, with the server's loss; weights moved
    assert [a.step for a in applied] == [0, 1, 2, 3, 4]
    assert all(a.loss > 0 for a in applied) and pipeline.depth == 3
    assert hub.engine.steps_applied == 5
    assert not torch.equal(weights(host.runner), before)


class Scripted:
    """A connection whose peer answers every request with ``answer(request)``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.replies: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.replies.append(self.answer(msg))

    async def recv(self, timeout_s: float) -> Message:
        return self.replies.pop(0)


def scripted_link(tmp_path: Path, answer: Any) -> Upstream:
    [host], _ = deployment(tmp_path, "vanilla")
    link = Upstream(host.cfg, host.metrics, make_handshake(host.cfg, tmp_path, "vanilla"))
    link.conn = Scripted(answer)  # type: ignore[assignment]
    return link


async def never_rejoin() -> None:
    raise AssertionError("a mismatched reply must be refused, not retried")


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        (lambda m: m.follow(Kind.EVALUATE).reply(Kind.RESULT), "result reply to evaluate"),
        (lambda m: m.follow(Kind.FORWARD, step=m.step + 1).reply(Kind.BACKWARD), "step \\(0, 4\\)"),
        (lambda m: m.follow(Kind.FORWARD, epoch=1).reply(Kind.BACKWARD), "step \\(1, 3\\)"),
        (lambda m: m.follow(Kind.BACKWARD), "reply to no request"),
    ],
    ids=["another-kind", "another-step", "another-epoch", "no-request"],
)
async def test_the_link_refuses_a_reply_to_another_request(
    tmp_path: Path, answer: Any, named: str
) -> None:
    # Prepare: a peer that answers a forward of step (0, 3) with a reply to something else
    link = scripted_link(tmp_path, answer)
    forward = Message(kind=Kind.FORWARD, client="client-1", epoch=0, step=3)
    # Execute / Assert: a protocol error naming both, never the reply taken as this one's
    with pytest.raises(ReplyMismatchError, match=named):
        await link.request(forward, never_rejoin)


async def test_the_link_returns_the_reply_that_answers_its_request(tmp_path: Path) -> None:
    link = scripted_link(tmp_path, lambda m: m.reply(Kind.BACKWARD, meta={"loss": 0.5}))
    forward = Message(kind=Kind.FORWARD, client="client-1", epoch=0, step=3)
    reply = await link.request(forward, never_rejoin)
    assert (reply.answers, reply.step, reply.meta["loss"]) == (Kind.FORWARD, 3, 0.5)


async def test_pipelining_refuses_a_reply_out_of_order(tmp_path: Path) -> None:
    # Prepare: a peer that answers each forward as if it were the next step
    [host], _ = deployment(tmp_path, "vanilla")
    host.cfg = dataclasses.replace(
        host.cfg, train=dataclasses.replace(host.cfg.train, pipeline_depth=2)
    )
    host.runner = topology("vanilla").runner(host, RunnerConfig.of(host.cfg))
    host.link = scripted_link(
        tmp_path / "link", lambda m: m.follow(Kind.FORWARD, step=m.step + 1).reply(Kind.BACKWARD)
    )
    batches = itertools.islice(host.runner.epoch_batches(0), 3)
    # Execute / Assert: the oldest step's reply must answer it
    with pytest.raises(
        ReplyMismatchError, match="waiting for the reply to forward at step \\(0, 0\\)"
    ):
        [a async for a in Pipeline(host).run(0, batches)]  # type: ignore[arg-type]


class Silent:
    """A connection whose peer takes every request and never answers."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def send(self, msg: Message) -> None:
        self.sent.set()

    async def recv(self, timeout_s: float) -> Message:
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("unreachable")

    def close(self, linger_ms: int = 0) -> None:
        return None


async def test_a_stop_ends_the_wait_for_a_reply_and_a_cancel_stays_a_cancel(
    tmp_path: Path,
) -> None:
    # Prepare: a link waiting for a reply that never comes
    link = scripted_link(tmp_path, None)
    link.conn = silent = Silent()  # type: ignore[assignment]
    forward = Message(kind=Kind.FORWARD, client="client-1", epoch=0, step=3)
    waiting = asyncio.ensure_future(link.request(forward, never_rejoin))
    await asyncio.wait_for(silent.sent.wait(), TIMEOUT_S)
    # Execute: the caller cancels the wait (not a stop)
    waiting.cancel()
    # Assert: the cancel reaches the caller as a cancel
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, TIMEOUT_S)
    # Execute: the next request waits, then SIGTERM's stop is set
    silent.sent.clear()
    waiting = asyncio.ensure_future(link.request(forward, never_rejoin))
    await asyncio.wait_for(silent.sent.wait(), TIMEOUT_S)
    link.stop.set()
    # Assert: the wait ends with Stopped, and the task is not left half-cancelled
    with pytest.raises(Stopped):
        await asyncio.wait_for(waiting, TIMEOUT_S)
    assert waiting.cancelling() == 0
    link.close()


async def test_a_stop_ends_a_pipelined_wait_for_a_reply(tmp_path: Path) -> None:
    # Prepare: two steps in flight to a peer that never answers, with a long reply wait
    [host], _ = deployment(tmp_path, "vanilla")
    host.cfg = dataclasses.replace(
        host.cfg, train=dataclasses.replace(host.cfg.train, pipeline_depth=2)
    )
    host.runner = topology("vanilla").runner(host, RunnerConfig.of(host.cfg))
    host.link = scripted_link(tmp_path / "link", None)
    host.link.conn = silent = Silent()  # type: ignore[assignment]
    host.link.timer.timeout = lambda kind: 3600.0  # type: ignore[method-assign]
    batches = itertools.islice(host.runner.epoch_batches(0), 3)
    running = asyncio.ensure_future(_drain(Pipeline(host).run(0, batches)))  # type: ignore[arg-type]
    await asyncio.wait_for(silent.sent.wait(), TIMEOUT_S)
    # Execute: SIGTERM's stop, while the pipeline waits for the oldest step's reply
    host.link.stop.set()
    # Assert: the wait ends at once with Stopped, not after the reply time-out
    with pytest.raises(Stopped):
        await asyncio.wait_for(running, 10.0)
    host.link.close()


async def _drain(applied: Any) -> list[Any]:
    return [a async for a in applied]
