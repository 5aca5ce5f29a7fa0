"""A relay that checkpoints every N > 1 steps: its clients resend the steps it lost, and a
next hop tells such a resend (the same request) from a redo (the same step, other inputs).

The kill -9 runs (real processes, SIGKILL between the relay's checkpoints, final steps and
accuracy against an uninterrupted run) are in tests/test_chaos.py (``relayevery4``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.errors import PeerError, RedoError
from sl_pipeline.messages import Kind, Message, request_digest
from sl_pipeline.models import build_segments, segment_inputs
from sl_pipeline.transport import DealerConnection
from workers.client.link import make_handshake
from workers.client.rollback import Rewind, UndoPoints
from workers.client.worker import ClientWorker
from workers.runtime.checkpoint import decode, encode
from workers.runtime.resends import RESEND, RecordedSteps
from workers.server.replycache import ReplyCache
from workers.tools.inprocess import build_deployment, wait_until

from .conftest import load_client
from .test_relay_runs import serving

EVERY4 = ('checkpoint.dir="state/relay"', "checkpoint.every_steps=4")


def _step(step: int, act: torch.Tensor, redo: bool = False) -> Message:
    labels = torch.zeros(act.shape[0], dtype=torch.long)
    return Message(
        Kind.FORWARD,
        client="client-1",
        step=step,
        meta={"redo": True} if redo else {},
        tensors={"act": act, "labels": labels},
    )


def _relay_welcome(applied: list[int] | None, every: int = 4) -> dict[str, Any]:
    return {"applied": applied, "checkpoint_every": every, "recover": RESEND}


def test_a_resend_has_the_digest_of_its_first_send_and_a_redo_another() -> None:
    act = torch.randn(4, 3)
    assert request_digest(_step(5, act)) == request_digest(_step(5, act.clone()))
    assert request_digest(_step(5, act)) != request_digest(_step(5, act + 1e-6))
    assert request_digest(_step(5, act)) != request_digest(_step(6, act))


def test_the_reply_cache_answers_a_resend_and_refuses_a_redo_with_other_inputs() -> None:
    # Prepare: step (0, 5) answered once
    cache, first = ReplyCache(), _step(5, torch.randn(4, 3))
    reply = first.reply(Kind.BACKWARD, tensors={"grad": torch.ones(4, 3)})
    cache.put("client-1", "forward", (0, 5), reply, first)
    same, other = first.tensors["act"].clone(), torch.randn(4, 3)

    # Execute / Assert: a resend is answered (also one recomputed with fresh activation
    # noise by a restarted client: the same rows); a redo only if it is the same request
    assert cache.get("client-1", "forward", (0, 5), _step(5, same)) is reply
    assert cache.get("client-1", "forward", (0, 5), _step(5, other)) is reply
    assert cache.get("client-1", "forward", (0, 5), _step(5, same, redo=True)) is reply
    with pytest.raises(RedoError, match=r"applied already with other inputs"):
        cache.get("client-1", "forward", (0, 5), _step(5, other, redo=True))


def test_the_digest_is_taken_after_the_reply_leaves_and_the_request_then_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: count the hashing of requests (0.1 ms a digits batch, 2 ms for 1 MiB)
    import workers.server.replycache as replycache

    hashed: list[Message] = []

    def counting(msg: Message) -> str:
        hashed.append(msg)
        return request_digest(msg)

    monkeypatch.setattr(replycache, "request_digest", counting)
    cache, first = ReplyCache(), _step(5, torch.randn(4, 3))

    # Execute: the step's reply is kept, then (its reply sent) the cache settles
    cache.put("client-1", "forward", (0, 5), first.reply(Kind.BACKWARD), first)
    assert hashed == []  # not on the step's critical path
    cache.settle()

    # Assert: hashed once, the request not held any more, a redo still told apart
    assert hashed == [first]
    kept = cache._names["client-1"]["forward"][(0, 5)]
    assert kept.request is None and kept.digest == request_digest(first)
    redo = _step(5, torch.randn(4, 3), redo=True)
    with pytest.raises(RedoError):
        cache.get("client-1", "forward", (0, 5), redo)
    cache.settle()
    assert hashed == [first, redo]  # the redo's own, and nothing again


def test_a_checkpointed_reply_cache_still_tells_a_redo_from_a_resend() -> None:
    cache, first = ReplyCache(), _step(5, torch.randn(4, 3))
    cache.put("client-1", "forward", (0, 5), first.reply(Kind.BACKWARD), first)
    restored = ReplyCache()

    restored.load(cache.entries())

    assert restored.get("client-1", "forward", (0, 5), first) is not None
    with pytest.raises(RedoError):
        restored.get("client-1", "forward", (0, 5), _step(5, torch.randn(4, 3), redo=True))


def test_the_client_keeps_nothing_unless_a_relay_checkpoints_every_n_steps() -> None:
    server, plain_relay = RecordedSteps(), RecordedSteps()
    server.configure({"applied": None, "checkpoint_every": 4}, in_flight=1, fresh=True)
    plain_relay.configure(_relay_welcome(None, every=1), in_flight=1, fresh=True)

    for recorded in (server, plain_relay):
        recorded.record(_step(0, torch.zeros(1, 1)))
        assert recorded.kept is None
        assert recorded.lost(_relay_welcome([0, 0]), (0, 0)) == []
        assert recorded.lost(_relay_welcome(None), (0, 0)) is None  # lost: said so


def test_the_client_resends_exactly_the_steps_after_the_relays_and_no_others() -> None:
    # Prepare: steps (0, 0)..(0, 6) sent; (0, 6) is in flight
    recorded = RecordedSteps()
    recorded.configure(_relay_welcome(None), in_flight=1, fresh=True)
    sent = [_step(s, torch.full((1, 1), float(s))) for s in range(7)]
    for msg in sent:
        recorded.record(msg)
    recorded.record(_step(6, torch.zeros(1, 1)))  # a resend of (0, 6): the first send stays

    # Execute
    lost = recorded.lost(_relay_welcome([0, 3]), last_applied=(0, 5))
    in_flight = recorded.lost(_relay_welcome([0, 5]), last_applied=(0, 5))
    nothing = recorded.lost(_relay_welcome([0, 6]), last_applied=(0, 5))

    # Assert: (0, 4) to (0, 6), the very requests sent first, the one in flight too (a
    # client restarted from its checkpoint would recompute it, other bytes where it pipelines)
    assert lost == sent[4:7] and in_flight == sent[6:7] and nothing == []
    assert recorded.kept is not None and len(recorded.kept) == 4 + 1 + 1


def test_the_recorded_requests_come_back_from_a_client_checkpoint_byte_for_byte() -> None:
    # Prepare: a client behind a relay checkpointing every 4 steps sent (0, 0)..(0, 5)
    recorded = RecordedSteps()
    recorded.configure(_relay_welcome(None), in_flight=2, fresh=True)
    sent = [_step(s, torch.randn(8, 3)) for s in range(6)]
    for msg in sent:
        recorded.record(msg)

    # Execute: through a checkpoint file's bytes (the client is killed, then restarted)
    state, _ = decode(encode({"resends": recorded.state()}, 6))
    restored = RecordedSteps()
    restored.load(state["resends"])

    # Assert: the same requests (digests), as many kept, the same steps to resend
    assert restored.kept is not None and recorded.kept is not None
    assert restored.kept.maxlen == recorded.kept.maxlen == 4 + 2 + 1
    assert [request_digest(m) for m in restored.kept] == [request_digest(m) for m in sent]
    lost = restored.lost(_relay_welcome([0, 2]), last_applied=(0, 4))
    assert [request_digest(m) for m in lost or []] == [request_digest(m) for m in sent[3:]]
    nothing = RecordedSteps()
    nothing.load(None)  # a checkpoint of an older version, or one that kept none
    assert nothing.kept is None


def test_a_step_no_longer_kept_is_reported_lost_not_skipped() -> None:
    recorded = RecordedSteps()
    recorded.configure(_relay_welcome(None, every=2), in_flight=1, fresh=True)
    for step in range(10):
        recorded.record(_step(step, torch.zeros(1, 1)))

    assert recorded.lost(_relay_welcome([0, 2]), last_applied=(0, 9)) is None
    assert recorded.lost(_relay_welcome(None), last_applied=(0, 9)) is None


def test_a_relay_that_lost_every_step_of_a_fresh_client_gets_them_all_again() -> None:
    recorded = RecordedSteps()
    recorded.configure(_relay_welcome(None), in_flight=1, fresh=True)
    sent = [_step(s, torch.zeros(1, 1)) for s in range(3)]
    for msg in sent:
        recorded.record(msg)

    assert recorded.lost(_relay_welcome(None), last_applied=(0, 2)) == sent


async def test_a_client_that_cannot_resend_is_refused_by_a_relay_checkpointing_every_4(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a client of an older version (its hello lists no recover = ["resend"])
    files = deployment(topology="multihop", dataset="breast_cancer")
    client = ClientWorker(load_client(files["client-1"]), files["server"].parent, progress=False)
    client.link.handshake.hello.pop("recover")
    async with serving(files, relay=EVERY4):
        # Execute
        with pytest.raises(PeerError) as refused:
            await asyncio.wait_for(client.run(), 60)

    # Assert: one line naming the relay's key and what to do
    assert refused.value.remote_code == "version"
    assert "\n" not in refused.value.reason
    assert "relay relay-1 checkpoints every 4 steps" in refused.value.reason
    assert "set checkpoint.every_steps = 1 in relay-1's config" in refused.value.reason


async def test_a_relay_checkpointing_every_4_steps_trains_a_client_to_the_end(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="multihop", dataset="breast_cancer", epochs=1)
    client = ClientWorker(load_client(files["client-1"]), files["server"].parent, progress=False)
    async with serving(files, relay=EVERY4) as run:
        summary = await asyncio.wait_for(client.run(), 120)
        applied = run.relay.steps_applied

    assert summary["steps"] == applied > 4 and summary["resent_steps"] == 0
    assert sorted(p.name for p in (files["server"].parent / "state" / "relay").glob("*.ckpt"))


@contextlib.asynccontextmanager
async def _server(files: dict[str, Any], *sets: str) -> AsyncIterator[Any]:
    run = build_deployment(files, server_overrides=sets)
    stop = asyncio.Event()
    serving_task = asyncio.ensure_future(run.server.serve(stop))
    try:
        await wait_until(run.server.ready)
        yield run.server
    finally:
        stop.set()
        await asyncio.wait_for(serving_task, 30)


async def test_a_server_answers_a_resend_from_its_cache_and_refuses_a_redo(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server checkpointing every 4 steps (its clients may rewind and redo steps)
    files = deployment(topology="vanilla", dataset="breast_cancer")
    cfg = load_client(files["client-1"])
    handshake = make_handshake(cfg, files["server"].parent, "vanilla")
    shape = segment_inputs(build_segments(cfg.model, "vanilla"), cfg.model.in_shape)[1]
    first = _step(0, torch.randn(4, *shape))
    ctx = zmq.asyncio.Context()
    async with _server(
        files, 'checkpoint.dir="state/server"', "checkpoint.every_steps=4"
    ) as server:
        conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
        try:
            await conn.handshake(handshake, 10.0)
            # Execute: the step, the same step again (a resend), then a redo with other rows
            await conn.send(first)
            answer = await conn.recv(30.0)
            await conn.send(first)
            again = await conn.recv(30.0)
            await conn.send(_step(0, first.tensors["act"] + 1.0, redo=True))
            with pytest.raises(PeerError) as refused:
                await conn.recv(30.0)
        finally:
            conn.close()
            ctx.destroy(linger=0)
        applied = server.steps_applied

    # Assert: applied once; the resend got the same gradient; the redo a one-line refusal
    assert applied == 1
    assert torch.equal(answer.tensors["grad"], again.tensors["grad"])
    assert refused.value.remote_code == "redo" and "\n" not in refused.value.reason


def test_a_rewound_client_marks_the_steps_it_redoes_and_no_others() -> None:
    # Prepare: undo points after steps (0, 0)..(0, 5); the server resumed at (0, 3)
    undo = UndoPoints()
    undo.configure(server_every=4, in_flight=1)
    for step in range(6):
        undo.record((0, step), lambda: {"at": 0})
    with pytest.raises(Rewind):
        undo.check((0, 3), last_applied=(0, 5))

    # Execute
    marked = [undo.marked(_step(step, torch.zeros(1, 1))) for step in range(3, 8)]

    # Assert: (0, 4) and (0, 5) are redone; (0, 3) the server holds, (0, 6) is new
    assert [m.meta.get("redo") for m in marked] == [None, True, True, None, None]
