"""Encrypted vs plaintext round trip through the real Channel over loopback TCP.

The parent process is the client (:class:`DealerConnection`); a child process is the
server (``peers.channel_peer``). Each round trip is encode+seal -> send -> open+decode ->
a reply of the same size -> open+decode. Plaintext (PlainSession) and encrypted (Noise IK
session, AES-256-GCM) connections run side by side, alternating blocks of round trips, so
both see the same machine load.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection

from . import peers
from .common import CTX, endpoint, free_port, median, start_child, stop_child

SIZES = {"4KiB": 4 * 1024, "64KiB": 64 * 1024, "2MiB": 2 * 1024 * 1024}
GOAL_2MIB = 1.10
TIMEOUT_S = 30.0


class _UngatedHandshake(ClientHandshake):
    """The bench's server has no connection gate (it admits any key), so a keyed client
    offers no gate token: the gate costs once per connection, never per message."""

    def connect_token(self, now_s: float) -> bytes | None:
        return None


async def connect(
    ctx: zmq.asyncio.Context, url: str, server_key: bytes | None, name: str
) -> DealerConnection:
    """A joined connection: Noise IK when ``server_key`` is given, plaintext otherwise."""
    conn = DealerConnection(ctx, url)
    static = generate_keypair() if server_key is not None else None
    await conn.handshake(_UngatedHandshake({"client": name}, static, server_key), TIMEOUT_S)
    return conn


async def round_trips(conn: DealerConnection, message: Message, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await conn.send(message)
        await conn.recv(TIMEOUT_S)
        samples.append(time.perf_counter() - start)
    return samples


def _plan(quick: bool) -> tuple[int, int, float]:
    """(blocks, round trips per block, time budget per size in seconds)."""
    return (5, 6, 4.0) if quick else (10, 20, 20.0)


async def measure(
    url: str, server_key: bytes, quick: bool, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    blocks, per_block, budget_s = _plan(quick)
    ctx = zmq.asyncio.Context()
    result: dict[str, Any] = {"rtt_ms": {}, "encryption_overhead": {}}
    try:  # a failed connect must not leave a context for the garbage collector to hang on
        plain = await connect(ctx, url, None, "bench-plain")
        sealed = await connect(ctx, url, server_key, "bench-sealed")
        for label, nbytes in (sizes or SIZES).items():
            message = Message(
                kind=Kind.FORWARD, meta={"reply": "echo"}, tensors={"act": torch.randn(nbytes // 4)}
            )
            await round_trips(plain, message, 2)  # warm-up: buffers, first-touch pages
            await round_trips(sealed, message, 2)
            times: dict[str, list[float]] = {"plain": [], "encrypted": []}
            deadline = time.monotonic() + budget_s
            for _ in range(blocks):
                times["plain"] += await round_trips(plain, message, per_block)
                times["encrypted"] += await round_trips(sealed, message, per_block)
                if time.monotonic() > deadline:
                    break
            rtt = {mode: median(t) * 1e3 for mode, t in times.items()}
            result["rtt_ms"][label] = rtt | {"samples": len(times["plain"])}
            result["encryption_overhead"][label] = rtt["encrypted"] / rtt["plain"]
    finally:
        ctx.destroy(linger=0)
    result["goal_2MiB"] = GOAL_2MIB
    if "2MiB" in result["encryption_overhead"]:
        result["goal_met"] = result["encryption_overhead"]["2MiB"] <= GOAL_2MIB
    return result


def run(quick: bool = False, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    url = endpoint(free_port())
    ready, stop = CTX.Queue(), CTX.Event()
    child = start_child(peers.channel_peer, url, ready, stop)
    try:
        server_key = ready.get(timeout=60)
        return asyncio.run(measure(url, server_key, quick, sizes))
    finally:
        stop.set()
        stop_child(child)
