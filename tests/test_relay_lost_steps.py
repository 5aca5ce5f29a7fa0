"""A relay that checkpoints every N > 1 steps, restarted past its checkpoint: it runs the
steps it lost again itself, from its log of the requests (:mod:`workers.runtime.requestlog`).

Before, it kept only their digests, and its clients had to resend each lost step as the
request first sent: a client restarted with it that recomputed a step in flight (other
bytes) was refused (``redo``, the run could not go on), and several clients' resends ran
interleaved otherwise than the first time (the relay's replay diverged). Now it runs them in
their first order before it takes a message, and answers every resend from the replayed
replies. Over loopback sockets; the kill -9 runs are in tests/test_chaos.py (``relayevery4``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.config import LimitsConfig, RelayConfig, load
from sl_pipeline.errors import CheckpointError, PeerError, TransportError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, segment_inputs
from sl_pipeline.transport import DealerConnection
from workers.cli import main
from workers.client.link import make_handshake
from workers.relay import RelayWorker
from workers.runtime.requestlog import RequestLog
from workers.tools.inprocess import build_deployment, wait_until

from .conftest import load_client

EVERY4 = ("checkpoint.dir='state/relay'", "checkpoint.every_steps=4", "checkpoint.fsync=false")


def _step(client: str, step: int, act: torch.Tensor) -> Message:
    labels = torch.zeros(act.shape[0], dtype=torch.long)
    return Message(Kind.FORWARD, client=client, step=step, tensors={"act": act, "labels": labels})


@contextlib.asynccontextmanager
async def _serving(worker: Any) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(worker.serve(stop))
    try:
        await wait_until(worker.ready)
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


def _chain(deployment: Any, steps: int) -> tuple[dict[str, Path], Any, list[Message], Any]:
    """A multihop deployment whose relay checkpoints every 4 steps, and client-1's first
    ``steps`` requests (and the activations' shape)."""
    files = deployment(topology="multihop", dataset="breast_cancer", clients=2)
    run = build_deployment(files, relay_overrides=EVERY4)
    cfg = load_client(files["client-1"])
    shape = segment_inputs(build_segments(cfg.model, "multihop"), cfg.model.in_shape)[1]
    return files, run, [_step("client-1", i, torch.randn(8, *shape)) for i in range(steps)], shape


class Peer:
    """A client's raw connection to the relay: what a hostile enrolled client can send."""

    def __init__(self, files: dict[str, Path], name: str, ctx: zmq.asyncio.Context) -> None:
        self.cfg = load_client(files[name])
        self.hs = lambda: make_handshake(self.cfg, files["server"].parent, "multihop")
        self.ctx, self.conn, self.welcome = ctx, None, {}  # type: ignore[var-annotated]

    async def join(self) -> dict[str, Any]:
        if self.conn is not None:
            self.conn.close()
        self.conn = DealerConnection(self.ctx, self.cfg.client.server, self.cfg.limits.to_limits())
        self.welcome = await self.conn.handshake(self.hs(), 10.0)
        return self.welcome

    async def ask(self, msg: Message) -> Message:
        assert self.conn is not None
        await self.conn.send(msg)
        return await self.conn.recv(30.0)

    async def refused(self, msg: Message) -> PeerError:
        with pytest.raises(PeerError) as refusal:
            await self.ask(msg)
        assert "\n" not in refusal.value.reason
        return refusal.value


def _weights(worker: RelayWorker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in worker.segment.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _restarted(files: dict[str, Path]) -> RelayWorker:
    return RelayWorker(load(RelayConfig, files["relay-1"], list(EVERY4)), files["server"].parent)


async def test_a_restarted_relay_runs_the_steps_it_lost_itself_and_answers_resends_from_them(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: client-1 takes steps 0..5 through a relay checkpointing every 4 steps, which
    # is then killed (no checkpoint at its stop): steps 4 and 5 are lost, the server holds them
    files, run, sent, shape = _chain(deployment, 6)
    ctx = zmq.asyncio.Context()
    one, two = Peer(files, "client-1", ctx), Peer(files, "client-2", ctx)
    try:
        async with _serving(run.server):
            async with _serving(run.relay):
                await one.join()
                first = [await one.ask(msg) for msg in sent]
                weights = _weights(run.relay)
                run.relay.ckpt = None  # a kill -9: nothing saved at its stop
            # Execute: its restart (ready once it ran the lost steps again), then what a
            # client restarted with it sends
            relay = _restarted(files)
            async with _serving(relay):
                replayed, ran = _weights(relay), relay.steps_applied
                welcome = await one.join()
                resent = await one.ask(sent[4])  # its recorded request
                # its step 5 recomputed with other weights (a pipelined client restarted from
                # an older checkpoint): before, refused as a redo, and the run stopped
                recomputed = await one.ask(_step("client-1", 5, sent[5].tensors["act"] + 0.5))
                old = await one.ask(sent[2])
                after = _weights(relay)
                ahead = await one.ask(_step("client-1", 6, torch.randn(8, *shape)))
                await two.join()  # another client naming client-1's step 4: its own step 4
                theirs = await two.ask(_step("client-1", 4, sent[4].tensors["act"]))
    finally:
        for peer in (one, two):
            if peer.conn is not None:
                peer.conn.close()
        ctx.destroy(linger=0)

    # Assert: the relay stood where it stood before the kill once started, and said so
    assert welcome["applied"] == [0, 5]
    assert ran == 6 and _same(replayed, weights)
    # every resend of client-1's, whatever its bytes, answered from the replayed replies
    for got, want in ((resent, first[4]), (recomputed, first[5]), (old, first[2])):
        assert torch.equal(got.tensors["grad"], want.tensors["grad"])
    assert _same(after, weights)  # none of them ran
    assert ahead.kind is theirs.kind is Kind.BACKWARD and relay.steps_applied == 6 + 2
    steps = [tuple(s) for s in relay.applied_log]
    assert steps.count(("client-1", 0, 4)) == steps.count(("client-1", 0, 5)) == 1
    assert ("client-2", 0, 4) in steps  # filed under its own name: it touched no one else's
    assert not torch.equal(theirs.tensors["grad"], first[4].tensors["grad"])


async def test_several_clients_lost_steps_run_again_in_their_first_order(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: two clients behind a relay checkpointing every 4 steps, their steps
    # interleaved (1: 0, 2: 0, 1: 1, 2: 1 | 1: 2, 2: 2, 1: 3); killed past its checkpoint,
    # so the last three are lost
    files, run, ones, shape = _chain(deployment, 4)
    twos = [_step("client-2", i, torch.randn(8, *shape)) for i in range(3)]
    order = [ones[0], twos[0], ones[1], twos[1], ones[2], twos[2], ones[3]]
    ctx = zmq.asyncio.Context()
    one, two = Peer(files, "client-1", ctx), Peer(files, "client-2", ctx)
    peers = {"client-1": one, "client-2": two}
    try:
        async with _serving(run.server):
            async with _serving(run.relay):
                await one.join()
                await two.join()
                first = [await peers[msg.client].ask(msg) for msg in order]
                weights = _weights(run.relay)
                run.relay.ckpt = None  # a kill -9
            # Execute: restarted; client-2 rejoins first and resends its lost step, then
            # client-1 its two (each client in its own order: not the first interleaving)
            relay = _restarted(files)
            async with _serving(relay):
                await two.join()
                await one.join()
                again = [await peers[msg.client].ask(msg) for msg in (twos[2], *ones[2:])]
                restored = _weights(relay)
    finally:
        for peer in (one, two):
            if peer.conn is not None:
                peer.conn.close()
        ctx.destroy(linger=0)

    # Assert: the same gradients as the first time and the weights of before the kill
    # (before, client-2's step 2 ran first, on weights without client-1's step 2)
    for got, want in zip(again, [first[5], first[4], first[6]], strict=True):
        assert torch.equal(got.tensors["grad"], want.tensors["grad"])
    assert _same(restored, weights)
    steps = [tuple(s) for s in relay.applied_log]
    assert len(steps) == len(set(steps)) == 7 and relay.steps_applied == 7


async def test_a_request_torn_by_a_crash_is_cut_off_and_the_next_one_kept(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1's steps 0..4 through a relay checkpointing every 4 steps, killed while
    # appending step 4's request (its last record torn: a power loss mid-append)
    files, run, sent, _ = _chain(deployment, 5)
    ctx = zmq.asyncio.Context()
    one = Peer(files, "client-1", ctx)
    try:
        async with _serving(run.server):
            async with _serving(run.relay):
                await one.join()
                first = [await one.ask(msg) for msg in sent]
                run.relay.ckpt = None  # a kill -9: nothing saved at its stop
                path = run.relay.requests.path if run.relay.requests else Path()
            torn = path.read_bytes()
            path.write_bytes(torn[: len(torn) - 20])
            # its restart cuts step 4 off (its reply never left); the client resends it and
            # it runs as new; then the relay is killed again before its next checkpoint
            second = _restarted(files)
            async with _serving(second):
                start = (await one.join())["applied"]
                resent = await one.ask(sent[4])
                weights, whole = _weights(second), path.stat().st_size
                second.ckpt = None
            # Execute: the third start
            third = _restarted(files)
            async with _serving(third):
                welcome = await one.join()
                replayed, ran = _weights(third), third.steps_applied
    finally:
        if one.conn is not None:
            one.conn.close()
        ctx.destroy(linger=0)
    # Assert: the torn record went, the step appended after it was whole, and the third
    # start ran it again from the log (a torn tail left in place would have swallowed it)
    assert start == [0, 3] and torch.equal(resent.tensors["grad"], first[4].tensors["grad"])
    assert whole == len(torn) and path.stat().st_mode & 0o777 == 0o600  # its clients' data
    assert welcome["applied"] == [0, 4] and ran == 5 and _same(replayed, weights)


def test_the_request_log_stops_at_its_cap_and_a_restart_refuses_one_over_it(
    tmp_path: Path,
) -> None:
    # Prepare: a log with room for one 8-row request but not two
    msg = _step("client-1", 0, torch.randn(8, 30))
    (tmp_path / "probe").mkdir()
    probe = RequestLog(tmp_path / "probe", "r", fsync=False, max_bytes=2**20)
    assert probe.append(1, msg)
    log = RequestLog(tmp_path, "relay-1", fsync=False, max_bytes=probe.size * 3 // 2)
    # Execute
    took = [log.append(1, msg), log.append(2, msg)]
    size = log.size
    log.checkpointed()
    after = [log.append(3, msg), log.size]
    lowered = RequestLog(tmp_path, "relay-1", fsync=False, max_bytes=probe.size - 1)
    with pytest.raises(CheckpointError) as over:
        lowered.read(0, LimitsConfig().to_limits())
    # Assert: the second append wrote nothing (the relay checkpoints instead), and a log
    # over the cap is refused in one line naming the setting
    assert took == [True, False] and size == probe.size
    assert after == [True, probe.size]
    assert "relay.request_log_mib" in str(over.value) and "\n" not in str(over.value)


async def test_a_relay_checkpoints_a_step_that_would_take_its_log_over_the_cap(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a relay whose log has room for one request
    files, run, sent, _ = _chain(deployment, 3)
    ctx = zmq.asyncio.Context()
    one = Peer(files, "client-1", ctx)
    try:
        async with _serving(run.server), _serving(run.relay):
            requests = run.relay.requests
            assert requests is not None and run.relay.ckpt is not None
            await one.join()
            await one.ask(sent[0])
            requests.max_bytes = requests.size * 3 // 2
            # Execute: step 1 would take it over
            await one.ask(sent[1])
            at_cap = (requests.size, [int(p.stem[8:]) for p in run.relay.ckpt.list()])
            await one.ask(sent[2])
            size = requests.size
    finally:
        if one.conn is not None:
            one.conn.close()
        ctx.destroy(linger=0)
    # Assert: checkpointed at step count 2 (every_steps = 4 would wait for 4), the log
    # emptied; the next step logged again
    assert at_cap == (0, [2]) and 0 < size <= requests.max_bytes


def test_a_relay_checkpointing_less_often_than_the_server_holds_steps_is_refused(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a restart would lose up to 17 steps of one client, the server holds its newest 16: the
    # replay (and before it, the client's resends) would be refused as stale, past the start
    files = deployment(topology="multihop", dataset="breast_cancer")
    sets = ["--set", "checkpoint.dir='state/relay'", "--set", "checkpoint.every_steps=18"]
    code = main(["relay", "--config", str(files["relay-1"]), *sets])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "checkpoint.every_steps = 18" in lines[0], lines
    assert "at most 17" in lines[0]


def test_a_request_log_cap_of_zero_is_refused_in_one_line(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = deployment(topology="multihop", dataset="breast_cancer")
    sets = [arg for value in (*EVERY4, "relay.request_log_mib=0") for arg in ("--set", value)]
    code = main(["relay", "--config", str(files["relay-1"]), *sets])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "relay.request_log_mib" in lines[0], lines


async def test_a_relay_that_cannot_run_a_lost_step_again_stops_in_one_line_and_keeps_it(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: steps 0..5, the relay killed past its checkpoint (steps 4 and 5 lost)
    files, run, sent, _ = _chain(deployment, 6)
    ctx = zmq.asyncio.Context()
    one = Peer(files, "client-1", ctx)

    async def unreachable(msg: Message) -> Message:
        raise TransportError("the server went away")

    try:
        async with _serving(run.server):
            async with _serving(run.relay):
                await one.join()
                [await one.ask(msg) for msg in sent]
                run.relay.ckpt = None  # a kill -9
                path = run.relay.requests.path if run.relay.requests else Path()
            saved, logged = sorted(path.parent.glob("*.ckpt")), path.read_bytes()
            # Execute: a start whose next hop does not answer the replayed step, then one
            # whose does
            failing = _restarted(files)
            failing._ask_upstream = unreachable  # type: ignore[method-assign]
            with pytest.raises(CheckpointError) as stopped:
                await asyncio.wait_for(failing.serve(asyncio.Event()), 30)
            kept = (sorted(path.parent.glob("*.ckpt")), path.read_bytes())
            relay = _restarted(files)
            async with _serving(relay):
                welcome = await one.join()
    finally:
        if one.conn is not None:
            one.conn.close()
        ctx.destroy(linger=0)
    # Assert: one line naming the client, the step and the cause; no checkpoint taken at that
    # stop and the log kept, so the next start ran them again
    reason = str(stopped.value)
    assert "client-1's step (0, 4)" in reason and "went away" in reason and "\n" not in reason
    assert kept == (saved, logged)
    assert welcome["applied"] == [0, 5] and relay.steps_applied == 6


def test_a_request_log_damaged_before_its_end_is_refused_not_cut(tmp_path: Path) -> None:
    # Prepare: three logged steps; a byte of the first one's body flipped (the disk, not a
    # crash: a crash tears only the last record, and the whole ones after it are steps)
    log = RequestLog(tmp_path, "relay-1", fsync=False, max_bytes=2**20)
    for count in (1, 2, 3):
        assert log.append(count, _step("client-1", count, torch.randn(8, 30)))
    log.close()
    data = bytearray(log.path.read_bytes())
    data[40] ^= 0xFF
    log.path.write_bytes(bytes(data))
    # Execute
    again = RequestLog(tmp_path, "relay-1", fsync=False, max_bytes=2**20)
    with pytest.raises(CheckpointError) as damaged:
        again.read(0, LimitsConfig().to_limits())
    # Assert: refused in one line, the file as it was (before: read as a torn tail, the
    # three steps cut off the file under "dropped a torn last record")
    assert "count 1" in str(damaged.value) and "\n" not in str(damaged.value)
    assert log.path.read_bytes() == bytes(data)
