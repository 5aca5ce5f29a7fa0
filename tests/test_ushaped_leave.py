"""A u-shaped run does not stall when one of its clients leaves, dies or stalls mid-step.

A u-shaped step is open on the server between its output going out and the gradient of that
output coming back, and one step is open at a time: the other clients' forwards wait. A step
whose client left (bye, its session dropped or replaced) or that held the server
``server.open_step_s`` while others waited is abandoned: nothing of it applied, the next
waiting forward served, the late gradient answered ``step_lost`` and the step redone.

The engine tests drive :class:`MiddleEngine` with messages and a clock (it is sans-IO); the
others speak over loopback sockets to a server bound here, or run the workers as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import PeerError, StepLostError, TransportError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import load_keypair, load_public_key
from sl_pipeline.messages import Kind, Message
from sl_pipeline.tensors import read_tensor
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.server.engines.middle import MiddleEngine
from workers.tools.demo import stop_process
from workers.tools.inprocess import wait_until
from workers.tools.localdeploy import free_port
from workers.topologies import topology

from .conftest import ROOT, load_client, load_server, wait_listening
from .test_hostile_cross import two_clients
from .test_hostile_numeric import serving
from .test_hostile_peers import assert_refused, hello_for, join

BOUND_S = 2.0  # server.open_step_s in these tests


def middle(files: dict[str, Path], *sets: str) -> MiddleEngine:
    cfg: ServerConfig = load_server(files["server"], f"server.open_step_s={BOUND_S}", *sets)
    engine = topology(cfg.server.topology).engine(cfg, files["server"].parent)
    assert isinstance(engine, MiddleEngine) and engine.act_shape is not None
    return engine


def fwd(engine: MiddleEngine, client: str, step: int = 0) -> Message:
    assert engine.act_shape is not None
    act = torch.rand(4, *engine.act_shape)
    return Message(Kind.FORWARD, client=client, step=step, tensors={"act": act})


def bwd(result: Message) -> Message:
    grad = torch.randn(read_tensor(result, "out").shape)
    return result.follow(Kind.BACKWARD, answers=None, tensors={"grad": grad})


def weights(engine: MiddleEngine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.model.parameters()]


def test_a_step_held_past_the_bound_while_another_waits_is_abandoned(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1 opens a step at t=100; c2's forward waits behind it
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    engine.at(100.0)
    ((_, opened),) = engine.handle(b"c1", fwd(engine, "c1"))
    before = weights(engine)
    assert engine.handle(b"c2", fwd(engine, "c2")) == []
    # Execute: the clock moves on, to just under the bound, then to it
    early = engine.at(100.0 + BOUND_S - 0.01)
    due = engine.at(100.0 + BOUND_S)
    # Assert: not before the bound; then c2's forward is served, to c2, and nothing of
    # c1's step was applied
    assert early == []
    ((to, result),) = due
    assert (to, result.kind, result.client) == (b"c2", Kind.RESULT, "c2")
    assert engine.abandoned == 1 and engine.steps_applied == 0 and engine.queue_depth() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine), strict=True))
    # c1's late gradient: step_lost (c1 redoes the step); c2's step ends normally
    with pytest.raises(StepLostError):
        engine.handle(b"c1", bwd(opened))
    ((_, grad),) = engine.handle(b"c2", bwd(result))
    assert grad.kind is Kind.BACKWARD and engine.steps_applied == 1


def test_a_client_that_leaves_mid_step_frees_the_server_at_once(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1's step is open, c2 and c3 wait (in that order)
    engine = middle(deployment(topology="ushaped", clients=3, dataset="breast_cancer"))
    engine.handle(b"c1", fwd(engine, "c1"))
    engine.handle(b"c2", fwd(engine, "c2"))
    engine.handle(b"c3", fwd(engine, "c3"))
    # Execute: c1 leaves (bye, or its session was dropped or replaced)
    freed = engine.forget("c1")
    # Assert: c2, first in the queue, is served now, without waiting for its resend (before,
    # nothing was served until a waiting client's reply timed out and it resent); c3 waits
    ((to, result),) = freed
    assert (to, result.kind, result.client) == (b"c2", Kind.RESULT, "c2")
    assert engine.abandoned == 1 and engine.queue_depth() == 1 and engine.steps_applied == 0


def test_no_client_abandons_another_clients_step(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1's step is open; c2 waits
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    engine.at(0.0)
    ((_, opened),) = engine.handle(b"c1", fwd(engine, "c1"))
    engine.handle(b"c2", fwd(engine, "c2"))
    # Execute: c2 sends a gradient for c1's step (under its own name: the server names a
    # message's client by its session), then c2 leaves
    forged = bwd(opened).follow(Kind.BACKWARD, client="c2")
    with pytest.raises(StepLostError):
        engine.handle(b"c2", forged)
    left = engine.forget("c2")
    # Assert: c1's step is still open, and ends as c1's
    assert left == [] and engine.abandoned == 0 and engine.queue_depth() == 0
    ((to, grad),) = engine.handle(b"c1", bwd(opened))
    assert (to, grad.kind, grad.client) == (b"c1", Kind.BACKWARD, "c1")


def test_a_client_alone_may_take_its_time(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1's step is open, nobody waits
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    engine.at(0.0)
    ((_, opened),) = engine.handle(b"c1", fwd(engine, "c1"))
    # Execute: far past the bound
    due = engine.at(50 * BOUND_S)
    # Assert: it holds nobody up, so its step stays open and is applied
    assert due == [] and engine.abandoned == 0
    ((_, grad),) = engine.handle(b"c1", bwd(opened))
    assert grad.kind is Kind.BACKWARD and engine.steps_applied == 1


def test_the_bound_counts_from_when_another_client_waits(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1 alone opens a step at t=0 and takes its time
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    engine.at(0.0)
    ((_, opened),) = engine.handle(b"c1", fwd(engine, "c1"))
    # Execute: c2's forward comes far past the bound, then waits a little
    engine.at(50 * BOUND_S)
    arrived = engine.handle(b"c2", fwd(engine, "c2"))
    early = engine.at(50 * BOUND_S + BOUND_S / 2)
    # Assert: c1's step held nobody up until c2 came, so it is not abandoned the moment
    # c2's forward arrives (before, it was: the bound counted from c1's step, while the docs
    # say "held the server open_step_s while another client's forward waited"); its gradient
    # within the bound of c2's arrival is applied, then c2 is served
    assert arrived == [] and early == [] and engine.abandoned == 0
    ((_, grad), (to, result)) = engine.handle(b"c1", bwd(opened))
    assert grad.kind is Kind.BACKWARD and (to, result.kind) == (b"c2", Kind.RESULT)
    assert engine.steps_applied == 1


def test_new_forwards_do_not_hold_the_server_past_the_bound(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1 opens a step at t=0; c2 waits
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    engine.at(0.0)
    engine.handle(b"c1", fwd(engine, "c1", step=0))
    engine.handle(b"c2", fwd(engine, "c2"))
    # Execute: c1 sends forwards of new steps instead of a gradient, each under the bound
    for step in (1, 2):
        engine.at(step * 0.4 * BOUND_S)
        ((_, result),) = engine.handle(b"c1", fwd(engine, "c1", step=step))
        assert result.client == "c1"
    due = engine.at(BOUND_S)
    # Assert: the bound counts from c1's first step: c2 is served at it
    ((to, result),) = due
    assert (to, result.client) == (b"c2", "c2") and engine.abandoned == 1


def test_an_abandoned_step_is_never_answered_from_the_cache(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1's step is open, then abandoned (it left); c2's is open
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    first = fwd(engine, "c1")
    engine.handle(b"c1", first)
    assert engine.replays(first, applied=False)  # its output lost on the way: resent
    engine.handle(b"c2", fwd(engine, "c2"))
    engine.forget("c1")
    # Assert: c1's resent forward is run again (its cached output would be answered
    # step_lost at every redo); a step that was applied is answered from the cache
    assert not engine.replays(first, applied=False)
    assert engine.replays(first, applied=True)


def test_two_clients_slower_than_the_bound_both_train_and_are_told_why(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1 and c2, each of whose steps takes 1.5 bounds between its output and its
    # gradient (a slow head, a loaded host), each redoing its step at step_lost and sending
    # its next step's forward as soon as one is applied, three steps each
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    head_s, now, lost = 1.5 * BOUND_S, 0.0, {"c1": "", "c2": ""}
    done = {"c1": 0, "c2": 0}
    engine.at(now)
    ((_, c1_out),) = engine.handle(b"c1", fwd(engine, "c1"))
    opened = {"c1": (now, c1_out)}
    engine.handle(b"c2", fwd(engine, "c2"))  # waits
    # Execute: time passes (at most 30 bounds); each gradient comes head_s after its output
    for _ in range(120):
        now += BOUND_S / 4
        for _, reply in engine.at(now):
            opened[reply.client] = (now, reply)
        for client, (at, out) in list(opened.items()):
            if now - at < head_s:
                continue
            del opened[client]
            try:
                replies = engine.handle(client.encode(), bwd(out))
                done[client] += 1
                if done[client] < 3:
                    replies += engine.handle(client.encode(), fwd(engine, client, done[client]))
            except StepLostError as exc:
                lost[client] = exc.message  # its redo: the forward again, queued
                replies = engine.handle(client.encode(), fwd(engine, client, done[client]))
            for _, reply in replies:
                if reply.kind is Kind.RESULT:
                    opened[reply.client] = (now, reply)
    # Assert: no livelock (before, each abandoned the other's step in turn and nothing was
    # ever applied): each late gradient doubled its client's bound, so every step was
    # applied, after one abandoned step each; each client was told why its step was lost
    assert done == {"c1": 3, "c2": 3} and engine.steps_applied == 6
    assert engine.abandoned == 2
    assert all("server.open_step_s" in why and "raise" in why for why in lost.values())
    assert engine.bound_for("c1") == engine.bound_for("c2") == 2 * BOUND_S


def test_a_client_that_never_sends_its_gradient_earns_no_longer_bound(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1 opens steps and never sends a gradient; c2 waits behind each
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    now = 0.0
    engine.at(now)
    engine.handle(b"c1", fwd(engine, "c1"))
    # Execute: c2 and c1 take turns waiting; c1 reopens a step each time c2's is applied
    for step in range(4):
        engine.handle(b"c2", fwd(engine, "c2", step))
        now += BOUND_S
        ((_, c2_out),) = engine.at(now)  # c1's step abandoned after one bound, c2 served
        engine.handle(b"c1", fwd(engine, "c1", step + 1))  # c1 queues its next step
        replies = engine.handle(b"c2", bwd(c2_out))
        assert [r.kind for _, r in replies] == [Kind.BACKWARD, Kind.RESULT]
    # Assert: each of c1's steps was abandoned after the plain bound, never a doubled one;
    # a late gradient (the slow client's sign) would have doubled it
    assert engine.abandoned == 4 and engine.steps_applied == 4
    assert engine.bound_for("c1") == BOUND_S


def test_a_client_answering_each_abandon_with_no_gradient_earns_no_longer_bound(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1 opens steps and computes nothing; c2 waits behind each (red team)
    engine = middle(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    now = 0.0
    engine.at(now)
    ((_, c1_out),) = engine.handle(b"c1", fwd(engine, "c1"))
    # Execute: at each abandon c1 sends a BACKWARD for its step with no gradient in it (or
    # one of another shape), costing it nothing, then opens its step again
    held = []  # bounds c1's step held c2 each time
    for step in range(4):
        engine.handle(b"c2", fwd(engine, "c2", step))
        served: list[Any] = []
        while not served:
            now += BOUND_S
            served = engine.at(now)
            held.append(step)
        ((_, c2_out),) = served
        junk = {} if step % 2 else {"grad": torch.zeros(1)}
        with pytest.raises(StepLostError):
            engine.handle(b"c1", c1_out.follow(Kind.BACKWARD, answers=None, tensors=junk))
        engine.handle(b"c1", fwd(engine, "c1"))  # queued behind c2's open step
        replies = engine.handle(b"c2", bwd(c2_out))
        c1_out = replies[-1][1]
    # Assert: no gradient, no grace: each abandon came after the plain bound (before: the
    # first empty BACKWARD doubled c1's bound and the second made it 4x, for a client that
    # never computed a gradient)
    assert held == [0, 1, 2, 3] and engine.abandoned == 4
    assert engine.bound_for("c1") == BOUND_S


# ---- over loopback sockets, to a server bound here ------------------------------------------
async def takeover(bind: str, fingerprint: str, keys: Path, ctx: Any, name: str) -> Any:
    """A second session of ``name`` (a client that rejoined), replacing its live one."""
    conn = DealerConnection(ctx, bind)
    hello = {**hello_for(fingerprint, name), "takeover": True}
    keypair, server = load_keypair(keys / f"{name}.key"), load_public_key(keys / "server.pub")
    await conn.handshake(ClientHandshake(hello, keypair, server), 5)
    return conn


async def step_lost(conn: DealerConnection, grad: Message) -> str:
    await conn.send(grad)
    error = await assert_refused(conn)
    assert error.remote_code == "step_lost"
    return error.reason


async def test_a_step_lost_at_a_rejoin_is_redone_not_answered_from_the_cache(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 opens step (0, 0); then rejoins (its reply timed out, say), which
    # abandons the step its old session held
    files = deployment(topology="ushaped", clients=2, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    async with serving(files) as (server, ctx, _):
        bind, fp = server.cfg.server.bind, server.fingerprint
        old = await join(bind, fp, keys, ctx, "client-1")
        assert server.engine.act_shape is not None
        first = Message(Kind.FORWARD, tensors={"act": torch.rand(4, *server.engine.act_shape)})
        await old.send(first)
        result = await old.recv(10)
        conn = await takeover(bind, fp, keys, ctx, "client-1")
        try:
            # Execute: its gradient (step_lost), then its redo: the forward again, the
            # gradient of the new output
            await step_lost(conn, bwd(result))
            await conn.send(first)
            redone = await conn.recv(10)
            await conn.send(bwd(redone))
            reply = await conn.recv(10)
            # Assert: the redo ran the forward again (before, the cached output of the
            # abandoned step came back, its gradient was step_lost again, at every redo:
            # the client gave up after 10) and was applied once
            assert reply.kind is Kind.BACKWARD and server.steps_applied == 1
            assert server.engine.abandoned == 1
        finally:
            old.close()
            conn.close()


async def test_an_abandoned_steps_client_redoes_it_behind_the_waiting_one(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 opens a step and sends no gradient; client-2's forward waits
    files = deployment(topology="ushaped", clients=2, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    async with serving(files, "server.open_step_s=0.5") as (server, ctx, _):
        bind, fp = server.cfg.server.bind, server.fingerprint
        late = await join(bind, fp, keys, ctx, "client-1")
        waiting = await join(bind, fp, keys, ctx, "client-2")
        try:
            assert server.engine.act_shape is not None
            act = torch.rand(4, *server.engine.act_shape)
            first = Message(Kind.FORWARD, tensors={"act": act})
            await late.send(first)
            opened = await late.recv(10)
            await waiting.send(Message(Kind.FORWARD, tensors={"act": act}))
            # Execute: client-2 waits without resending; client-1's gradient comes late
            served = await waiting.recv(10)
            why = await step_lost(late, bwd(opened))
            await late.send(first)  # client-1 redoes its step: it waits behind client-2's
            await waiting.send(bwd(served))
            applied = await waiting.recv(10)
            redone = await late.recv(10)
            await late.send(bwd(redone))
            # Assert: client-2 was served at the bound; client-1's step was redone, on the
            # weights client-2's step left; each step applied once
            kinds = (served.kind, applied.kind, redone.kind)
            assert kinds == (Kind.RESULT, Kind.BACKWARD, Kind.RESULT)
            assert (await late.recv(10)).kind is Kind.BACKWARD
            assert server.steps_applied == 2 and server.engine.abandoned == 1
            # client-1 is told why (a head slower than the bound is abandoned at every redo
            # while others wait, a livelock of two slow clients: before, it read only 'no open
            # forward', and gave up with 'step 0 was lost 10 times')
            assert "abandoned your open step (0, 0)" in why and "server.open_step_s" in why
            hits = server.metrics.registry.get_sample_value(
                "sl_bound_hits_total", {"table": "open_steps"}
            )
            assert hits == 1
        finally:
            late.close()
            waiting.close()


async def test_a_connection_closed_mid_step_frees_the_server_at_once(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: no time bound (open_step_s = 0); client-1 opens a step, client-2's forward waits
    files = deployment(topology="ushaped", clients=2, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    async with serving(files, "server.open_step_s=0") as (server, ctx, _):
        bind, fp = server.cfg.server.bind, server.fingerprint
        dying = await join(bind, fp, keys, ctx, "client-1")
        waiting = await join(bind, fp, keys, ctx, "client-2")
        try:
            assert server.engine.act_shape is not None
            act = torch.rand(4, *server.engine.act_shape)
            await dying.send(Message(Kind.FORWARD, tensors={"act": act}))
            assert (await dying.recv(10)).kind is Kind.RESULT
            await waiting.send(Message(Kind.FORWARD, tensors={"act": act}))
            await wait_until(lambda: server.engine.queue_depth() == 1)
            # Execute: client-1's connection closes without a bye (its process killed, say)
            dying.close()
            served = await waiting.recv(10)
            # Assert: client-2 was served as soon as the server saw the connection close
            # (before, only when client-1's silence ran out, server.client_timeout_s = 120 s,
            # or never with the bound off); client-1's session ended, its step abandoned
            assert served.kind is Kind.RESULT and server.engine.abandoned == 1
            assert [peer.name for peer in server.peers.values()] == ["client-2"]
        finally:
            if dying.channel is not None:  # not closed yet: the test failed before
                dying.close()
            waiting.close()


async def test_a_bye_naming_another_client_abandons_only_the_senders_step(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1's step is open
    async with two_clients(deployment, "ushaped") as (server, honest, hostile, _):
        assert server.engine.act_shape is not None
        act = torch.rand(4, *server.engine.act_shape)
        await honest.send(Message(Kind.FORWARD, tensors={"act": act}))
        opened = await honest.recv(10)
        # Execute: client-2 says bye in client-1's name (its session is its own name)
        await hostile.send(Message(Kind.BYE, client="client-1"))
        await wait_until(lambda: len(server.peers) == 1)
        await honest.send(bwd(opened))
        reply = await honest.recv(10)
        # Assert: client-2 left, client-1's step was still open and was applied
        assert reply.kind is Kind.BACKWARD and server.steps_applied == 1
        assert server.engine.abandoned == 0


async def test_a_client_that_never_closes_its_steps_slows_an_honest_one_only_by_the_bound(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server with open_step_s = 0.5 s; client-2 (hostile, by hand) opens step
    # after step and never sends a gradient: each time its output comes back, it sends the
    # forward of its next step at once
    files = deployment(topology="ushaped", clients=2, dataset="breast_cancer")
    base, bound_s = files["server"].parent, 0.5
    async with serving(files, f"server.open_step_s={bound_s}") as (server, ctx, task):
        bind, fp = server.cfg.server.bind, server.fingerprint
        hostile = await join(bind, fp, base / "keys", ctx, "client-2")
        assert server.engine.act_shape is not None
        act = torch.rand(4, *server.engine.act_shape)
        opened = [0]

        async def hold_forever() -> None:
            while True:
                step = opened[0]
                await hostile.send(Message(Kind.FORWARD, step=step, tensors={"act": act}))
                with contextlib.suppress(PeerError, TransportError):
                    if (await hostile.recv(30)).kind is Kind.RESULT:
                        opened[0] += 1

        holding = asyncio.create_task(hold_forever())
        await wait_until(lambda: opened[0] >= 1)
        # Execute: client-1 trains its epoch meanwhile
        client = ClientWorker(load_client(files["client-1"]), base, progress=False)
        started = time.monotonic()
        try:
            summary = await asyncio.wait_for(client.run(), 120)
        finally:
            holding.cancel()
            await asyncio.gather(holding, return_exceptions=True)
            hostile.close()
        took_s = time.monotonic() - started
        # Assert: client-1 trained every step, each applied once; the hostile client's
        # steps were abandoned, never applied; client-1 waited at most about one bound a step
        assert summary["steps"] == server.steps_applied > 0
        assert server.engine.abandoned >= 1 and opened[0] >= 2
        assert took_s < summary["steps"] * (bound_s + 1.0), took_s
        assert not task.done()
        print(f"{summary['steps']} steps in {took_s:.1f}s, {server.engine.abandoned} abandoned")


# ---- the workers as processes: a client killed mid-step -------------------------------------
def until(condition: Callable[[], bool], what: str, *alive: Any, timeout_s: float = 120) -> None:
    """Poll ``condition`` (bounded); a process of ``alive`` that ended fails it at once."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc in alive:
            assert proc.poll() is None, f"{proc.args} ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s"
        time.sleep(0.05)


def applied_steps(status_url: str) -> int:
    """The server's applied steps, by its /status (-1 while its ops port is not up yet)."""
    try:
        with urllib.request.urlopen(status_url, timeout=30) as reply:
            return sum(run["steps"] for run in json.loads(reply.read())["runs"])
    except urllib.error.URLError:
        return -1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_client_killed_mid_step_does_not_stall_the_others(deployment, procs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a u-shaped server (open_step_s = 2 s), client-1 and client-2 training (the
    # console command, each its own process), and client-3 joined by a process of its own
    files = deployment(topology="ushaped", clients=3, dataset="digits", epochs=3)
    port = free_port()
    status = f"http://127.0.0.1:{port}/status"
    bound, listen = f"server.open_step_s={BOUND_S}", f'ops.listen="127.0.0.1:{port}"'
    server = procs.fork("server", files["server"], "--set", bound, "--set", listen)
    wait_listening(files["server"], server)
    holder_cmd = [sys.executable, "-m", "tests.ushaped_holder", str(files["server"])]
    holder = subprocess.Popen([*holder_cmd, "client-3", str(tmp_path)], cwd=ROOT, text=True)
    procs.procs.append(holder)
    until(lambda: (tmp_path / "joined").exists(), "client-3's join", holder, server)
    window = "client.retry_for_s=20"  # an honest client gives up after 20 s unanswered
    honest = [
        procs.fork("client", files[f"client-{i}"], "--json", "--no-progress", "--set", window)
        for i in (1, 2)
    ]
    until(lambda: applied_steps(status) >= 10, "10 applied steps", *honest, server)
    # Execute: client-3 opens a step, and is killed (SIGKILL) once its output came back
    (tmp_path / "go").touch()
    until(lambda: (tmp_path / "opened").exists(), "client-3's open step", holder, *honest)
    holder.send_signal(signal.SIGKILL)
    killed, steps = time.monotonic(), applied_steps(status)
    until(lambda: applied_steps(status) > steps, "a step after the kill", *honest, server)
    recovered_s = time.monotonic() - killed
    codes = [proc.wait(120) for proc in honest]
    finished_s = time.monotonic() - killed
    # Assert: the others carried on within the bound (before, the step stayed open until
    # client-3's session was dropped, server.client_timeout_s = 120 s: each honest client
    # gave up after its 20 s window, exit 4) and trained to their end; the server says so
    summaries = [json.loads(proc.out.read_text().strip().splitlines()[-1]) for proc in honest]
    logs = [proc.log.read_text()[-2000:] for proc in honest]
    assert codes == [0, 0], logs
    assert recovered_s < BOUND_S + 5, recovered_s
    assert applied_steps(status) == sum(s["steps"] for s in summaries)
    stop_process(server)  # type: ignore[arg-type]
    assert "abandoned client-3's open step" in server.log.read_text()
    print(f"recovered {recovered_s:.2f}s after the kill, both finished after {finished_s:.1f}s")
