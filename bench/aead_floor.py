"""What the cipher alone costs inside a real round trip: the floor under ``encryption_overhead``.

``python -m bench.aead_floor [--pairs N] [--json]``. The client (this process, the real
:class:`DealerConnection`) and the server (a child: ``bench.peers``' ZMTP listener and
``Channel``) run plaintext and encrypted round trips in alternating blocks, as
``bench.crypto_rt`` does, while every AEAD call of the sessions in both processes is timed
(``perf_counter_ns`` around ``encrypt_into``/``decrypt_into``). Per size it reports the
plaintext and encrypted round trip (medians of the block medians), their ratio (median of the
pair ratios), the AEAD time per encrypted round trip (both processes), and the **floor**
``(plain + aead) / plain`` (median of the pairs): the ratio an encrypted round trip would
show if encryption cost nothing besides its AEAD calls and none of them overlapped other
work. Timing a call costs about a microsecond, which the encrypted side carries here.

The calls are timed where they run, after the wake-ups and beside the other process, so they
cost what they cost in a round trip, not what ``aead_gb_s`` measures in a hot loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import RawArray
from multiprocessing.synchronize import Event
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline import ciphers
from sl_pipeline.ciphers import Aead
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.runtime import eventloop

from . import peers
from .common import CTX, endpoint, free_port, median, paired, start_child, stop_child
from .crypto_rt import SIZES, connect, round_trips

Totals = Any  # a RawArray("q", 2): nanoseconds in AEAD calls, and their number


class TimedAead:
    """A suite's AEAD whose sealing and opening calls add their time to :attr:`totals`."""

    totals: Totals = None

    def __init__(self, aead: Aead) -> None:
        self._aead = aead

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return self._aead.encrypt(nonce, data, aad)  # REKEY only: once in 2^20 messages

    def encrypt_into(self, nonce: bytes, data: Any, aad: Any, out: Any) -> int:
        start = time.perf_counter_ns()
        try:
            return self._aead.encrypt_into(nonce, data, aad, out)
        finally:
            self._count(start)

    def decrypt_into(self, nonce: bytes, data: Any, aad: Any, out: Any) -> int:
        start = time.perf_counter_ns()
        try:
            return self._aead.decrypt_into(nonce, data, aad, out)
        finally:
            self._count(start)

    def _count(self, start: int) -> None:
        totals = TimedAead.totals
        totals[0] += time.perf_counter_ns() - start
        totals[1] += 1


def _timed(suite: ciphers.CipherSuite) -> ciphers.CipherSuite:
    return dataclasses.replace(suite, make=lambda key: TimedAead(suite.make(key)))


def install(totals: Totals) -> dict[str, ciphers.CipherSuite]:
    """Sessions negotiated from now on in this process time their AEAD calls into
    ``totals``; returns the suites they used before (to put back)."""
    before = dict(ciphers.SUITES)
    TimedAead.totals = totals
    ciphers.SUITES.update({name: _timed(suite) for name, suite in before.items()})
    return before


def timed_peer(url: str, ready: Queue, stop: Event, totals: Totals) -> None:
    install(totals)
    peers.channel_peer(url, ready, stop)


async def _block(conn: DealerConnection, message: Message, count: int) -> float:
    return median(await round_trips(conn, message, count))


async def _size(
    conns: dict[str, DealerConnection], nbytes: int, pairs: int, per_block: int, totals: Totals
) -> dict[str, Any]:
    message = Message(
        kind=Kind.FORWARD, meta={"reply": "echo"}, tensors={"act": torch.randn(nbytes // 4)}
    )
    for conn in conns.values():
        await _block(conn, message, 5)  # warm-up
    rtt: dict[str, list[float]] = {mode: [] for mode in conns}
    aead: list[float] = []
    calls: list[float] = []
    for i in range(pairs):
        for mode in list(conns) if i % 2 == 0 else list(reversed(conns)):
            ns, count = sum(t[0] for t in totals), sum(t[1] for t in totals)
            rtt[mode].append(await _block(conns[mode], message, per_block))
            if mode == "encrypted":
                aead.append((sum(t[0] for t in totals) - ns) / 1e9 / per_block)
                calls.append((sum(t[1] for t in totals) - count) / per_block)
    floors = [(p + a) / p for p, a in zip(rtt["plain"], aead, strict=True)]
    return {
        "plain_ms": median(rtt["plain"]) * 1e3,
        "encrypted_ms": median(rtt["encrypted"]) * 1e3,
        "ratio": paired(rtt["encrypted"], rtt["plain"])["median"],
        "aead_ms": median(aead) * 1e3,
        "aead_calls": median(calls),  # per round trip, both processes
        "floor": median(floors),
        "pairs": pairs,
    }


async def _measure(url: str, key: bytes, pairs: int, per_block: int, totals: Totals) -> Any:
    ctx = zmq.asyncio.Context()
    try:
        conns = {
            "plain": await connect(ctx, url, None, "floor-plain"),
            "encrypted": await connect(ctx, url, key, "floor-sealed"),
        }
        return {
            label: await _size(conns, nbytes, pairs, per_block, totals)
            for label, nbytes in SIZES.items()
        }
    finally:
        ctx.destroy(linger=0)


def run(pairs: int = 20, per_block: int = 10) -> dict[str, Any]:
    """Per size: plain and encrypted round trip, ratio, AEAD time, floor (module doc)."""
    here, there = RawArray("q", 2), RawArray("q", 2)
    ready, stop = CTX.Queue(), CTX.Event()
    suites = install(here)
    try:  # the suites go back even if the child never starts
        url = endpoint(free_port())
        child = start_child(timed_peer, url, ready, stop, there)
        try:
            key = ready.get(timeout=60)
            return dict(eventloop.run(_measure(url, key, pairs, per_block, (here, there))))
        finally:
            stop.set()
            stop_child(child)
    finally:
        ciphers.SUITES.update(suites)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aead_floor", description=__doc__)
    parser.add_argument("--pairs", type=int, default=20, help="pairs of blocks per size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(pairs=max(1, args.pairs))
    if args.json:
        print(json.dumps(result))
        return 0
    heads = ("size", "plain ms", "sealed ms", "ratio", "aead ms", "calls", "floor")
    print("{:>6} {:>9} {:>9} {:>6} {:>8} {:>5} {:>6}".format(*heads))
    for label, row in result.items():
        print(
            f"{label:>6} {row['plain_ms']:9.3f} {row['encrypted_ms']:9.3f} {row['ratio']:6.3f}"
            f" {row['aead_ms']:8.3f} {row['aead_calls']:5.1f} {row['floor']:6.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
