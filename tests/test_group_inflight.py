"""``limits.max_inflight_bytes`` on a server with groups, over real loopback sockets: the
bytes of unfinished chunked messages are one budget for the server, and over it the session
to go is the biggest holder of the group holding the most (``PeerTable.over_budget``), so
one group's keys holding the budget cost another group's client nothing but its turn."""

from __future__ import annotations

import torch

from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .test_group_quotas import TWO
from .test_hostile_numeric import serving
from .test_run_groups import _hello

CHUNK = 4096  # every peer here sends in chunks this small (the least a session takes)


def _forward(server: ServerWorker, step: int) -> Message:
    """A training step of 256 rows, the most server.max_batch lets a message carry."""
    shape = server.engine.act_shape
    assert shape is not None
    tensors = {"act": torch.rand(256, *shape), "labels": torch.zeros(256, dtype=torch.int64)}
    return Message(Kind.FORWARD, step=step, tensors=tensors)


async def _hold(server: ServerWorker, conn: DealerConnection, name: str, nbytes: int) -> None:
    """``conn``'s key begins a chunked message 4x ``nbytes`` long and sends parts of it, one
    at a time, until the server holds ``nbytes`` of it; the rest never comes."""
    assert conn.channel is not None
    conn.channel.session.chunk_bytes = CHUNK
    parts = iter(conn.channel.session.seal_parts([b"{}", bytes(4 * nbytes)]))
    held = lambda: sum(p.partial_bytes for p in server.peers.values() if p.name == name)  # noqa: E731
    mine = 0
    while mine < nbytes:
        await conn.sock.send_multipart(next(parts), copy=False)
        await wait_until(lambda before=mine: held() > before, 10)
        mine = held()


async def test_group_b_trains_while_group_a_holds_the_inflight_budget(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the bank's forward is M bytes; the hospital's two keys each hold 0.6 M of
    # unfinished messages, and the budget is 1.9 M: the bank's forward, sent in chunks,
    # takes the server over it when the bank holds 0.7 M, more than either hospital key
    files = deployment(topology="vanilla", clients=3, dataset="breast_cancer")
    async with serving(files, TWO) as (server, ctx, _):
        size = sum(t.numel() * t.element_size() for t in _forward(server, 0).tensors.values())
    budget = f"limits.max_inflight_bytes={int(1.9 * size)}"
    async with serving(files, TWO, budget) as (server, ctx, task):
        c1, _ = await _hello(server, ctx, "client-1")
        c2, _ = await _hello(server, ctx, "client-2")
        for conn, name in ((c1, "client-1"), (c2, "client-2")):
            await _hold(server, conn, name, int(0.6 * size))
        bank, _ = await _hello(server, ctx, "client-3")
        assert bank.channel is not None
        bank.channel.session.chunk_bytes = CHUNK
        # Execute: the bank's client trains three steps
        replies = []
        for step in range(3):
            await bank.send(_forward(server, step))
            replies.append((await bank.recv(10)).kind)
        # Assert: each step applied in the bank's run; one hospital key lost its session
        # (before the groups' rule, the bank's, the biggest holder, lost its own)
        assert replies == [Kind.BACKWARD] * 3
        assert server.book.runs["bank:run-1"].steps == 3
        held = sorted(p.name for p in server.peers.values() if p.partial_bytes)
        assert len(held) == 1 and held[0] in ("client-1", "client-2")  # it still holds 0.6 M
        metric = server.metrics.registry.get_sample_value
        assert metric("sl_bound_hits_total", {"table": "inflight_bytes"}) == 1
        assert not task.done()
        for conn in (c1, c2, bank):
            conn.close()
