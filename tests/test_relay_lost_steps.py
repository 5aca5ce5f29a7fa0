"""A relay that checkpoints every N > 1 steps, restarted past its checkpoint: what a client
may send it for the steps it lost (red team's known limit, closed).

Before, the relay kept no record of a step its restart lost, so a client could resend
*other* activations there: the relay ran its segment on them while the server answered from
its cache with the gradient of the first ones (a mismatched update). Now it logs each step's
request digest between checkpoints (:mod:`workers.runtime.digestlog`) and runs a lost step
only on the request first sent, each client's in their order; anything else is refused in
one line and runs nothing, and the honest resends still bring it back where it stood.
Over loopback sockets; the kill -9 runs are in tests/test_chaos.py (``relayevery4``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.config import RelayConfig, load
from sl_pipeline.errors import PeerError, RedoError, StaleStepError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, segment_inputs
from sl_pipeline.transport import DealerConnection
from workers.client.link import make_handshake
from workers.relay import RelayWorker
from workers.runtime.digestlog import DigestLog
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


async def test_after_a_restart_a_relay_runs_a_lost_step_only_on_the_request_first_sent(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: client-1 takes steps 0..5 through a relay checkpointing every 4 steps, which
    # is then killed (no checkpoint at its stop): steps 4 and 5 are lost, the server holds them
    files, run, sent, shape = _chain(deployment, 6)
    base = files["server"].parent
    ctx = zmq.asyncio.Context()
    one, two = Peer(files, "client-1", ctx), Peer(files, "client-2", ctx)
    try:
        async with _serving(run.server):
            async with _serving(run.relay):
                await one.join()
                first = [await one.ask(msg) for msg in sent]
                weights = {k: v.clone() for k, v in run.relay.segment.state_dict().items()}
                run.relay.ckpt = None  # a kill -9: nothing saved at its stop
            relay = RelayWorker(load(RelayConfig, files["relay-1"], list(EVERY4)), base)
            async with _serving(relay):
                welcome = await one.join()
                # Execute: what a hostile client may send for the steps the relay lost
                other = _step("client-1", 4, sent[4].tensors["act"] + 0.5)
                different = [await one.refused(other) for _ in range(20)]  # a flood too
                skipped = await one.refused(sent[5])  # the later lost step first
                ahead = await one.refused(_step("client-1", 6, torch.randn(8, *shape)))
                replayed = await one.ask(sent[2])  # an old step: its cached reply
                hostile = relay.steps_applied
                # the honest resends, as first sent
                again = [await one.ask(msg) for msg in sent[4:]]
                restored = {k: v.clone() for k, v in relay.segment.state_dict().items()}
                then = await one.ask(other)  # step 4 is held again: its reply, not a run
                await two.join()  # another client sending "client-1"'s step 4: its own step 4
                theirs = await two.ask(_step("client-1", 4, sent[4].tensors["act"] + 0.5))
    finally:
        for peer in (one, two):
            if peer.conn is not None:
                peer.conn.close()
        ctx.destroy(linger=0)

    # Assert: each hostile send refused in one line, nothing run for client-1 meanwhile
    assert welcome["applied"] == [0, 3]
    assert {r.remote_code for r in different} == {"redo"}
    assert "other inputs" in different[0].reason
    assert skipped.remote_code == ahead.remote_code == "stale_step"
    assert "resend the recorded steps first" in skipped.reason
    assert torch.equal(replayed.tensors["grad"], first[2].tensors["grad"])
    assert hostile == 4  # none of them ran
    # the honest resends ran again on the same weights: the same gradients as the first
    # time, and the relay stands where it stood before the kill
    for got, want in zip(again, first[4:], strict=True):
        assert torch.equal(got.tensors["grad"], want.tensors["grad"])
    assert all(torch.equal(restored[k], weights[k]) for k in weights)
    assert torch.equal(then.tensors["grad"], first[4].tensors["grad"])
    assert theirs.kind is Kind.BACKWARD and relay.steps_applied == 4 + 2 + 1
    assert [tuple(s) for s in relay.applied_log].count(("client-1", 0, 4)) == 1


def test_lost_steps_not_run_again_survive_a_checkpoint_and_a_second_restart(
    tmp_path: Path,
) -> None:
    # Prepare: steps 0..3 applied past the checkpoint at 10 applied steps; the last line
    # torn (killed mid-write: that step's reply never left)
    sent = [_step("client-1", i, torch.randn(2, 3)) for i in range(4)]
    log = DigestLog(tmp_path, "relay-1", fsync=False)
    for count, msg in enumerate(sent, start=11):
        log.append(count, msg)
    with open(log.path, "a", encoding="utf-8") as fh:
        fh.write('[15, "client-1", 0, 4, "ab')
    restarted = DigestLog(tmp_path, "relay-1", fsync=False)
    assert restarted.restore(10, []) == 4
    # Execute: step 0 runs again, then a checkpoint, then a second restart from it
    assert restarted.check(sent[0]) is not None
    restarted.ran(sent[0])
    kept = restarted.state()
    restarted.checkpointed()
    again = DigestLog(tmp_path, "relay-1", fsync=False)

    # Assert: steps 1..3 are still lost, in order, and still only as first sent
    assert again.restore(11, kept) == 3
    with pytest.raises(StaleStepError):
        again.check(sent[2])
    with pytest.raises(RedoError):
        again.check(_step("client-1", 1, torch.randn(2, 3)))
    assert again.check(sent[1]) is not None


async def test_a_digest_torn_by_a_crash_does_not_swallow_the_next_one(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1's steps 0..4 through a relay checkpointing every 4 steps, killed while
    # appending step 4's digest (its last line torn: a power loss mid-append)
    files, run, sent, _ = _chain(deployment, 5)
    base = files["server"].parent
    ctx = zmq.asyncio.Context()
    one = Peer(files, "client-1", ctx)

    def relay() -> RelayWorker:
        return RelayWorker(load(RelayConfig, files["relay-1"], list(EVERY4)), base)

    try:
        async with _serving(run.server):
            async with _serving(run.relay):
                await one.join()
                [await one.ask(msg) for msg in sent]
                run.relay.ckpt = None  # a kill -9: nothing saved at its stop
                digests = run.relay.digests
                assert digests is not None
            torn = digests.path.read_bytes()
            digests.path.write_bytes(torn[: len(torn) - 20])
            # its restart: step 4's digest was torn, so step 4 runs again as a new step
            # (the request the client recorded); then it is killed again before step 5
            second = relay()
            async with _serving(second):
                await one.join()
                await one.ask(sent[4])
                second.ckpt = None
            # Execute: the third start; client-1 sends other activations for step 4
            third = relay()
            async with _serving(third):
                await one.join()
                other = await one.refused(_step("client-1", 4, sent[4].tensors["act"] + 0.5))
                ran = third.steps_applied
    finally:
        if one.conn is not None:
            one.conn.close()
        ctx.destroy(linger=0)
    # Assert: step 4's digest from the second start survived the torn line before it: the
    # third start runs step 4 only on the request first sent (before, the second start's
    # line was appended onto the torn one, and both read as one garbled line: the third
    # start ran step 4 on other activations while the server answered the first ones')
    assert other.remote_code == "redo" and ran == 4


def test_a_long_digest_log_is_read_back_in_linear_time(tmp_path: Path) -> None:
    # Prepare: a relay with checkpoint.every_steps = 30000 killed just before its checkpoint:
    # 29999 lost steps of one client in its digest log
    lines = [json.dumps([i + 1, "client-1", 0, i, f"{i:032x}"]) for i in range(29999)]
    (tmp_path / "relay-1.digests").write_text("\n".join(lines) + "\n")
    digests = DigestLog(tmp_path, "relay-1", fsync=False)
    # Execute: its restart reads them back
    started = time.monotonic()
    lost = digests.restore(0, [])
    took = time.monotonic() - started
    digests.close()
    # Assert: all of them, in well under the bound (before, each line scanned the client's
    # steps so far: 8000 lines took 9.4 s at load 8, these about two minutes; now ~0.5 s)
    assert lost == 29999 and took < 15, took
