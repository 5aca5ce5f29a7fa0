"""Red team, chunked messages: what an admitted peer's chunk heads may cost a listening worker.

Each test failed on the code before its fix (see docs/security.md, "Hostile peers")."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq.asyncio

from sl_pipeline.chunked import MIN_CHUNK_BYTES, layout
from sl_pipeline.errors import PeerError
from sl_pipeline.messages import MAX_ID_CHARS, MAX_META_KEYS
from sl_pipeline.session import Session
from workers.server.worker import ServerWorker

from .conftest import load_server
from .test_hostile_peers import (
    Served,
    _act_forward,
    _until,
    assert_serving,
    header,
    join,
    send_raw,
    served,
)

__all__ = ["served"]  # the fixture, used by name

HEADS = 100  # every other one is processed: the one after it abandons it (truncated)


def _head(session: Session, nbytes: int) -> list[bytes]:
    """A chunked head announcing ``nbytes`` in the smallest chunks there are, under the
    session's next counter, which it leaves where it is (the message never completes)."""
    counter = session._send_counter
    keys = session._send_keys(counter)
    frames = session._seal_part(keys, counter, 0, False, layout([nbytes], MIN_CHUNK_BYTES))
    return [bytes(f) for f in frames]


async def test_chunk_heads_announcing_a_million_tiny_chunks_cost_the_server_no_time(
    served: Served,
) -> None:
    """A head of ~90 bytes announcing 512 MiB in 4 KiB chunks made the receiver build the
    plan of every piece (131,088 tuples, +17 MiB) before any piece came: 0.15-0.7 s of the
    event loop per head, so an admitted peer sending heads stalled every other peer."""
    # Prepare
    server, files, ctx, task = served
    keys = files["server"].parent / "keys"
    conn = await join(server.cfg.server.bind, server.fingerprint, keys, ctx)
    assert conn.channel is not None and isinstance(conn.channel.session, Session)
    head = _head(conn.channel.session, server.limits.max_message_bytes)
    # Execute: the heads, then a heartbeat under a fresh session (the refusals say this one
    # was dropped), timed until the server has handled them all
    started = time.monotonic()
    for _ in range(HEADS):
        await conn.sock.send_multipart(head)
    refused = 0
    while refused < HEADS // 2:  # each abandoning head is refused ("truncated")
        try:
            await conn.recv(30)
        except PeerError as error:
            assert error.remote_code == "replay"
            refused += 1
    elapsed = time.monotonic() - started
    conn.close()
    honest = await join(server.cfg.server.bind, server.fingerprint, keys, ctx, name="client-2")
    # Assert: the heads cost no more than small messages do, and the server serves on
    assert elapsed < 2.0, f"{HEADS} chunk heads held the server {elapsed:.1f}s"
    await assert_serving(honest, task)
    honest.close()


async def test_a_relays_sub_name_too_long_to_qualify_is_refused_as_such(deployment) -> None:  # type: ignore[no-untyped-def]
    """A configured relay's client of 128 characters (the longest a message names) is one
    of ``relay/client`` over 128: before, qualifying it raised outside the server's refusals,
    and the relay was told ``internal: the message could not be handled; see the log``."""
    # Prepare: client-1 is a configured relay
    files = deployment(clients=2, dataset="breast_cancer")
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"], 'server.relays=["client-1"]'), base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await _until(lambda: server.bound)
        relay = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        # Execute
        await relay.send(_act_forward("c" * MAX_ID_CHARS))
        with pytest.raises(PeerError) as refused:
            await relay.recv(10)
        # Assert: a protocol error naming the name, and the relay is still served
        assert refused.value.remote_code == "protocol"
        assert "client" in refused.value.reason and "128" in refused.value.reason
        await assert_serving(relay, task)
        relay.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


async def test_a_meta_of_more_keys_than_its_bound_is_refused(served: Served) -> None:
    """docs/protocol.md bounds every object of meta to 256 keys; meta itself was not
    bounded (only by the 64 KiB header: some 7,000 keys)."""
    # Prepare
    server, files, ctx, task = served
    conn = await join(
        server.cfg.server.bind, server.fingerprint, files["server"].parent / "keys", ctx
    )
    # Execute
    await send_raw(conn, header(meta={f"k{i}": 0 for i in range(MAX_META_KEYS + 1)}))
    with pytest.raises(PeerError) as refused:
        await conn.recv(10)
    # Assert
    assert refused.value.remote_code == "protocol"
    assert f"meta has {MAX_META_KEYS + 1} keys" in refused.value.reason
    await assert_serving(conn, task)
    conn.close()
