"""Message-path throughput: our Channel + ZeroMQ against bare pyzmq + the same AEAD.

Both stream ``count`` messages of one size one way to a child process that decrypts each,
and wait for one acknowledgement after the last. Ours: Message -> encode -> Session.seal
-> ``send_multipart(copy=False)`` through :class:`DealerConnection`, and on the far side
ZmtpRouter -> Session.open -> decode. Raw: the default suite's AEAD (``encrypt``) over the
same bytes -> ``send(copy=False)`` on a plain DEALER, its ``decrypt`` on a plain ROUTER (the
connection ours uses picks that suite too). Trials of
the two run in pairs so they share the machine's load; the efficiency is the median of
the pair ratios.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import zmq
import zmq.asyncio

from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.runtime import eventloop

from . import peers
from .common import CTX, endpoint, free_port, median, paired, start_child, stop_child
from .crypto_rt import TIMEOUT_S, connect

SIZES = {"64KiB": 64 * 1024, "2MiB": 2 * 1024 * 1024}
MIB = 1024 * 1024


async def ours_trial(conn: DealerConnection, tensor: torch.Tensor, count: int) -> float:
    """Seconds to stream ``count`` messages and get the acknowledgement of the last."""
    bulk = Message(kind=Kind.FORWARD, meta={"reply": "none"}, tensors={"act": tensor})
    last = Message(kind=Kind.FORWARD, meta={"reply": "ack"}, tensors={"act": tensor})
    start = time.perf_counter()
    for _ in range(count - 1):
        await conn.send(bulk)
    await conn.send(last)
    await conn.recv(TIMEOUT_S)
    return time.perf_counter() - start


class RawSender:
    """Bare pyzmq DEALER + the default suite's AEAD, one frame per message, ``copy=False``."""

    def __init__(self, ctx: zmq.Context, url: str, key: bytes) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.aead = peers.raw_aead(key)
        self.counter = 0

    def trial(self, payload: bytearray, count: int) -> float:
        start = time.perf_counter()
        for i in range(count):
            frame = peers.raw_seal(self.aead, self.counter, payload, ack=i == count - 1)
            self.counter += 1
            self.sock.send(frame, copy=False)
        if not self.sock.poll(int(TIMEOUT_S * 1000), zmq.POLLIN):
            raise TimeoutError("raw peer did not acknowledge")
        self.sock.recv()
        return time.perf_counter() - start


def _plan(quick: bool) -> tuple[int, float]:
    """(trials per size, time budget per size in seconds)."""
    return (24, 6.0) if quick else (40, 15.0)


async def measure(
    ours_url: str, raw_url: str, server_key: bytes, key: bytes, quick: bool
) -> dict[str, Any]:
    trials, budget_s = _plan(quick)
    actx, ctx = zmq.asyncio.Context(), zmq.Context()
    conn = await connect(actx, ours_url, server_key, "bench-stream")
    raw = RawSender(ctx, raw_url, key)
    result: dict[str, Any] = {"throughput_mib_s": {}, "efficiency": {}, "efficiency_spread": {}}
    try:
        for label, nbytes in SIZES.items():
            count = max(4, (32 * MIB) // nbytes)  # about 32 MiB per trial
            tensor, payload = torch.randn(nbytes // 4), bytearray(os.urandom(nbytes))
            await ours_trial(conn, tensor, 2)
            raw.trial(payload, 2)
            times: dict[str, list[float]] = {"ours": [], "raw": []}
            deadline = time.monotonic() + budget_s
            for i in range(trials):  # pairs; the order inside a pair alternates
                if i % 2 == 0:
                    times["ours"].append(await ours_trial(conn, tensor, count))
                    times["raw"].append(raw.trial(payload, count))
                else:
                    times["raw"].append(raw.trial(payload, count))
                    times["ours"].append(await ours_trial(conn, tensor, count))
                if i >= 3 and time.monotonic() > deadline:
                    break
            rate = {k: count * nbytes / MIB / median(v) for k, v in times.items()}
            spread = paired(times["raw"], times["ours"])  # time ratio raw/ours = rate ours/raw
            result["throughput_mib_s"][label] = rate | {"trials": spread["pairs"]}
            result["efficiency"][label] = spread["median"]
            result["efficiency_spread"][label] = spread
    finally:
        conn.close()
        raw.sock.close(linger=0)
        actx.term()
        ctx.term()
    result["transport_efficiency"] = result["efficiency"]["2MiB"]
    result["transport_efficiency_spread"] = result["efficiency_spread"]["2MiB"]
    return result


def run(quick: bool = False) -> dict[str, Any]:
    ours_url, raw_url = endpoint(free_port()), endpoint(free_port())
    key = os.urandom(32)
    ready, stop = CTX.Queue(), CTX.Event()
    children = [
        start_child(peers.channel_peer, ours_url, ready, stop),
        start_child(peers.raw_peer, raw_url, key, ready, stop),
    ]
    try:
        answers = [ready.get(timeout=60) for _ in children]
        server_key = next(a for a in answers if a != b"raw")
        return eventloop.run(measure(ours_url, raw_url, server_key, key, quick))
    finally:
        stop.set()
        for child in children:
            stop_child(child)
