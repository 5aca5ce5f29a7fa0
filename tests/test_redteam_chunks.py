"""Red team, chunked messages: what an admitted peer's chunk heads may cost a listening worker.

Each test failed on the code before its fix (see docs/security.md, "Hostile peers")."""

from __future__ import annotations

import time

from sl_pipeline.chunked import MIN_CHUNK_BYTES, layout
from sl_pipeline.errors import PeerError
from sl_pipeline.session import Session

from .test_hostile_peers import Served, assert_serving, join, served

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
