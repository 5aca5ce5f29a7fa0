"""Hostile peers against their neighbours: what one admitted peer sends must not reach
another peer's step (cross-client denial of service, a step applied twice, another's error
words), whichever topology keeps their requests together (issue 15, the fourth red team).

Each test speaks over real loopback sockets with admitted keys (``join``) to a server bound
in this process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments
from sl_pipeline.tensors import read_tensor
from sl_pipeline.transport import DealerConnection
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .test_hostile_numeric import serving
from .test_hostile_peers import assert_refused, assert_serving, join
from .test_hostile_shapes import engine_of


@contextlib.asynccontextmanager
async def two_clients(
    deployment: Any, topology: str
) -> AsyncIterator[tuple[ServerWorker, DealerConnection, DealerConnection, asyncio.Task[Any]]]:
    """A server of ``topology`` bound here, and client-1 (honest) and client-2 (hostile)
    joined with their admitted keys, by hand, so a test can send them anything."""
    files = deployment(topology=topology, clients=2, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    async with serving(files) as (server, ctx, task):
        bind, fp = server.cfg.server.bind, server.fingerprint
        honest = await join(bind, fp, keys, ctx, "client-1")
        hostile = await join(bind, fp, keys, ctx, "client-2")
        try:
            yield server, honest, hostile, task
        finally:
            honest.close()
            hostile.close()


# ---- u-shaped: a queued forward is the queued client's, not the open step's ------------------
async def test_a_bad_queued_forward_never_reaches_the_open_step_of_another_client(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 opens a step; client-2's forward of the wrong shape queues behind it
    async with two_clients(deployment, "ushaped") as (server, honest, hostile, task):
        shape = server.engine.act_shape
        assert shape is not None
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
    async with two_clients(deployment, "splitfed") as (server, honest, hostile, task):
        size = sum(p.numel() for p in build_segments(server.cfg.model, "splitfed")[0].parameters())
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


# ---- vertical: a party's sample ids are checked with its part ------------------------------
BAD_IDS = {  # rows of act, ids
    "two-d": (4, torch.tensor([[0, 1], [2, 3]])),
    "too-few": (4, torch.tensor([0, 1])),
    "empty": (4, torch.zeros(0, dtype=torch.int64)),
    "float": (4, torch.tensor([0.0, 1.0, 2.0, 3.0])),
    "out-of-range": (4, torch.tensor([0, 1, 2, 10**9])),
    "rows-of-act": (3, torch.arange(4)),  # the other party's ids, for fewer rows
}


@pytest.mark.parametrize("bad", list(BAD_IDS))
async def test_a_partys_wrong_ids_are_its_own_refusal(deployment, bad: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1's honest part of batch 0 waits for client-2's
    async with two_clients(deployment, "vertical") as (server, honest, hostile, task):
        width = server.cfg.model.hidden
        ids = torch.arange(4)
        await honest.send(Message(Kind.FORWARD, tensors={"act": torch.rand(4, width), "ids": ids}))
        # Execute: client-2's part of the same batch, with wrong ids
        rows, wrong = BAD_IDS[bad]
        act = torch.rand(4, width)
        await hostile.send(Message(Kind.FORWARD, tensors={"act": act[:rows], "ids": wrong}))
        error = await assert_refused(hostile)
        # Assert: a protocol refusal naming the ids, to client-2 only; the batch still open,
        # which client-2's right part completes: each party gets its own gradient
        assert error.remote_code == "protocol" and "ids" in str(error)
        await assert_serving(honest)
        await hostile.send(Message(Kind.FORWARD, tensors={"act": act, "ids": ids}))
        for conn in (honest, hostile):
            reply = await conn.recv(10)
            assert reply.kind is Kind.BACKWARD and reply.tensors["grad"].shape == (4, width)
        assert server.steps_applied == 1
        await assert_serving(hostile, task)


async def test_parts_of_one_batch_with_different_ids_end_it_for_every_party(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1's part of batch 0 waits for client-2's
    async with two_clients(deployment, "vertical") as (server, honest, hostile, task):
        width = server.cfg.model.hidden
        act = torch.rand(4, width)
        await honest.send(Message(Kind.FORWARD, tensors={"act": act, "ids": torch.arange(4)}))
        # Execute: client-2's part names other rows (each id valid)
        await hostile.send(Message(Kind.FORWARD, tensors={"act": act, "ids": torch.arange(1, 5)}))
        # Assert: both are told at once, nothing applied; before, client-1 heard nothing
        for conn in (hostile, honest):
            error = await assert_refused(conn)
            assert error.remote_code == "protocol" and "different sample ids" in str(error)
        assert server.steps_applied == 0
        await assert_serving(honest, task)


async def test_a_client_leaving_mid_step_leaves_no_stale_forward_for_the_next(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-2 opens a step; client-1's forward queues behind it; client-2 leaves
    async with two_clients(deployment, "ushaped") as (server, honest, hostile, task):
        shape = server.engine.act_shape
        assert shape is not None
        act = torch.rand(4, *shape)
        await hostile.send(Message(Kind.FORWARD, tensors={"act": act}))
        await hostile.recv(10)
        first = Message(Kind.FORWARD, tensors={"act": act})
        await honest.send(first)
        await wait_until(lambda: server.engine.queue_depth() == 1)
        await hostile.send(Message(Kind.BYE))
        # Execute: client-1's queued forward is served at its client's leaving (before, only
        # at its resend, once its reply had timed out); it ends its step
        out = read_tensor(await honest.recv(10), "out")
        await honest.send(Message(Kind.BACKWARD, tensors={"grad": torch.randn(out.shape)}))
        assert (await honest.recv(10)).kind is Kind.BACKWARD
        # Assert: nothing more comes for the step (before, its stale queued copy was served
        # as a new step: an unasked result that ended the client as a mismatched reply)
        await assert_serving(honest, task)
        assert server.engine.queue_depth() == 0 and server.steps_applied == 1
