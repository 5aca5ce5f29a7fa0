"""Hostile peers against their neighbours: what one admitted peer sends must not reach
another peer's step (cross-client denial of service, a step applied twice, another's error
words), whichever topology keeps their requests together (issue 15, the fourth red team).

Each test speaks over real loopback sockets with admitted keys (``join``) to a server bound
in this process."""

from __future__ import annotations

import torch

from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments
from sl_pipeline.tensors import read_tensor

from .test_hostile_numeric import serving
from .test_hostile_peers import assert_refused, assert_serving, join
from .test_hostile_shapes import engine_of


# ---- u-shaped: a queued forward is the queued client's, not the open step's ------------------
async def test_a_bad_queued_forward_never_reaches_the_open_step_of_another_client(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 opens a step; client-2's forward of the wrong shape queues behind it
    files = deployment(topology="ushaped", clients=2, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    async with serving(files) as (server, ctx, task):
        shape = server.engine.act_shape
        assert shape is not None
        honest = await join(server.cfg.server.bind, server.fingerprint, keys, ctx, "client-1")
        hostile = await join(server.cfg.server.bind, server.fingerprint, keys, ctx, "client-2")
        act = torch.rand(4, *shape)
        await honest.send(Message(Kind.FORWARD, tensors={"act": act}))
        out = read_tensor(await honest.recv(10), "out")
        bad = torch.rand(4, shape[0] + 5)
        # Execute: client-2's forward while client-1's step is open, then client-1's backward
        await hostile.send(Message(Kind.FORWARD, tensors={"act": bad}))
        error = await assert_refused(hostile)  # at once: it never waits in the queue
        grad = Message(Kind.BACKWARD, tensors={"grad": torch.randn(out.shape)})
        await honest.send(grad)
        reply = await honest.recv(10)
        # Assert: client-2 alone is told why; client-1 got its own gradient, applied once
        assert error.remote_code == "protocol" and "shape" in str(error)
        assert reply.kind is Kind.BACKWARD and reply.answers is Kind.BACKWARD
        assert tuple(read_tensor(reply, "grad").shape) == tuple(act.shape)
        assert server.steps_applied == 1
        # the resend of client-1's backward is answered from the cache, not applied again
        await honest.send(grad)
        again = await honest.recv(10)
        assert again.kind is Kind.BACKWARD and server.steps_applied == 1
        await assert_serving(honest, task)
        honest.close()
        hostile.close()


def test_a_queued_forward_that_fails_is_refused_to_its_own_sender(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: c1's step is open; c2's forward, queued behind it, fails when it is served
    engine = engine_of(deployment(topology="ushaped", clients=2, dataset="breast_cancer"))
    assert engine.act_shape is not None
    act = torch.rand(4, *engine.act_shape)
    ((_, result),) = engine.handle(b"c1", Message(Kind.FORWARD, client="c1", tensors={"act": act}))
    queued = Message(Kind.FORWARD, client="c2", tensors={"act": act[:, :-1]})
    engine._waiting.add("c2", (b"c2", queued), "clients waiting for a step")
    # Execute
    grad = torch.randn(read_tensor(result, "out").shape)
    replies = engine.handle(b"c1", Message(Kind.BACKWARD, client="c1", tensors={"grad": grad}))
    # Assert: c1's gradient to c1, c2's refusal (its own words) to c2, the step applied once
    (to_c1, reply), (to_c2, refusal) = replies
    assert (to_c1, reply.kind, reply.client) == (b"c1", Kind.BACKWARD, "c1")
    assert (to_c2, refusal.kind, refusal.client) == (b"c2", Kind.ERROR, "c2")
    assert refusal.meta["code"] == "protocol" and refusal.answers is Kind.FORWARD
    assert engine.steps_applied == 1 and engine.queue_depth() == 0


# ---- SplitFed: one member's wrong-sized vector is its own refusal -------------------------
def join_round(nonce: str) -> Message:
    return Message(Kind.WEIGHTS, step=2, meta={"op": "join", "nonce": nonce})


def submit(attempt: str, words: torch.Tensor, step: int = 3) -> Message:
    meta = {"op": "submit", "attempt": attempt}
    return Message(Kind.WEIGHTS, step=step, meta=meta, tensors={"masked": words})


async def test_a_wrong_sized_submission_is_refused_to_its_sender_only(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: both members of a SplitFed round joined and got the announcement
    files = deployment(topology="splitfed", clients=2, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    async with serving(files) as (server, ctx, task):
        size = sum(p.numel() for p in build_segments(server.cfg.model, "splitfed")[0].parameters())
        bind, fp = server.cfg.server.bind, server.fingerprint
        honest = await join(bind, fp, keys, ctx, "client-1")
        hostile = await join(bind, fp, keys, ctx, "client-2")
        await honest.send(join_round("11" * 32))
        await hostile.send(join_round("22" * 32))
        attempt = (await honest.recv(10)).meta["attempt"]
        assert (await hostile.recv(10)).meta["attempt"] == attempt
        # Execute: client-2 submits first, a vector of another size; then client-1, rightly
        await hostile.send(submit(attempt, torch.zeros(size + 1, dtype=torch.int64)))
        error = await assert_refused(hostile)
        await honest.send(submit(attempt, torch.ones(size, dtype=torch.int64)))
        # Assert: client-2 is told the size; client-1's submission waits for the round
        assert error.remote_code == "protocol" and f"{size} words" in str(error)
        await assert_serving(honest)  # no refusal came before this heartbeat's answer
        await hostile.send(submit(attempt, torch.full((size,), 2, dtype=torch.int64), 5))
        summed = (await honest.recv(10)).tensors["sum"]
        assert torch.equal(summed, torch.full((size,), 3, dtype=torch.int64))
        assert torch.equal((await hostile.recv(10)).tensors["sum"], summed)
        await assert_serving(hostile, task)
        honest.close()
        hostile.close()
