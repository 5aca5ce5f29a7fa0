"""Chunk size of the chunked AEAD format: encrypted/plain 2 MiB round trip per chunk size.

The same client and server as ``bench.crypto_rt`` (the real Channel over loopback TCP), with
one encrypted connection per chunk size; the server replies with the chunk size the request
names (``meta["chunk_bytes"]``). Every encrypted mode is paired with the plaintext one in
interleaved blocks; ``chunk_table`` holds, per chunk size, the median pair ratio and its
quartiles (``chunk_cpu_table``: the same for both processes' CPU time). "whole" seals the
message as one ZeroMQ message (a chunk larger than it): both ends of this bench lift the
workers' frame cap (``MAXMSGSIZE`` of one default chunk) to allow it.
"""

from __future__ import annotations

from typing import Any

import torch
import zmq.asyncio

from sl_pipeline.chunked import MAX_CHUNK_BYTES
from sl_pipeline.messages import Kind, Message
from workers.runtime import eventloop

from . import peers
from .common import CTX, endpoint, free_port, paired, start_child, stop_child
from .crypto_rt import connect, paired_blocks, round_trips

KIB = 1024
CHUNKS = {
    "64KiB": 64 * KIB,
    "128KiB": 128 * KIB,
    "256KiB": 256 * KIB,
    "512KiB": 512 * KIB,
    "1MiB": 1024 * KIB,
    "whole": MAX_CHUNK_BYTES,
}
NBYTES = 2 * 1024 * KIB


async def measure(url: str, server_key: bytes, quick: bool) -> dict[str, Any]:
    peers.unbounded_frames()  # chunks beyond the default one, and "whole"
    ctx = zmq.asyncio.Context()
    tensor = torch.randn(NBYTES // 4)
    try:
        conns = {"plain": await connect(ctx, url, None, "bench-plain")}
        messages = {
            "plain": Message(kind=Kind.FORWARD, meta={"reply": "echo"}, tensors={"act": tensor})
        }
        for label, chunk in CHUNKS.items():
            conns[label] = await connect(ctx, url, server_key, f"bench-{label}")
            assert conns[label].channel is not None
            conns[label].channel.session.chunk_bytes = chunk  # type: ignore[union-attr]
            messages[label] = Message(
                kind=Kind.FORWARD,
                meta={"reply": "echo", "chunk_bytes": chunk},
                tensors={"act": tensor},
            )
        for mode, conn in conns.items():
            await round_trips(conn, messages[mode], 3)
        blocks, cpu = await paired_blocks(conns, messages, quick)
    finally:
        ctx.destroy(linger=0)
    table = {label: paired(blocks[label], blocks["plain"]) for label in CHUNKS}
    cpu_table = {label: paired(cpu[label], cpu["plain"]) for label in CHUNKS}
    return {"chunk_table": table, "chunk_cpu_table": cpu_table, "chunk_table_size": "2MiB"}


def run(quick: bool = False) -> dict[str, Any]:
    url = endpoint(free_port())
    ready, stop = CTX.Queue(), CTX.Event()
    child = start_child(peers.unbounded_channel_peer, url, ready, stop)
    try:
        return eventloop.run(measure(url, ready.get(timeout=60), quick))
    finally:
        stop.set()
        stop_child(child)
