"""The workers' event loop: uvloop against asyncio's own, side by side in one run.

Two echo servers (``peers.channel_peer`` in child processes), one on each loop, and two
clients in this process, each an encrypted :class:`DealerConnection` (the default suite) on
a loop of the same kind, kept open across blocks (``asyncio.Runner``). Blocks of round trips
alternate between the uvloop pair and the asyncio pair (the order inside a pair alternates
too), so both see the same machine load. ``event_loop_ratio`` is the median over pairs of
uvloop's block median round trip over asyncio's; ``event_loop_cpu_ratio`` the same for the
CPU time both processes spent per round trip. Below 1.0: uvloop is the cheaper loop.
Small messages only (4 KiB, 64 KiB): that is where a message's fixed costs, the loop's
turns among them, are most of a step (the digits CNN's activations are 2 KiB).
"""

from __future__ import annotations

import asyncio
import os
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.runtime import eventloop

from . import peers
from .common import CTX, endpoint, free_port, median, paired, start_child, stop_child
from .crypto_rt import _plan, both_cpu_s, connect, round_trips

SIZES = {"4KiB": 4 * 1024, "64KiB": 64 * 1024}
LOOPS = ("uvloop", "asyncio")


def peer_on(loop: str, url: str, ready: Queue, stop: Event) -> None:
    """``peers.channel_peer`` on the event loop ``loop`` (``SL_EVENT_LOOP``)."""
    os.environ[eventloop.ENV] = loop
    peers.channel_peer(url, ready, stop)


class _Party:
    """One client on one kind of loop, its loop kept between blocks."""

    def __init__(self, loop: str, url: str, server_key: bytes) -> None:
        os.environ[eventloop.ENV] = loop
        self.runner = asyncio.Runner(loop_factory=eventloop.loop_factory())
        self.ctx = zmq.asyncio.Context()
        self.conn: DealerConnection = self.runner.run(
            connect(self.ctx, url, server_key, f"bench-{loop}")
        )
        self.kind = self.runner.run(_running())

    def block(self, message: Message, count: int) -> tuple[float, float]:
        """(median round trip, CPU seconds of both processes per round trip)."""

        async def timed() -> tuple[float, float]:
            before = await both_cpu_s(self.conn)
            rtt = median(await round_trips(self.conn, message, count))
            return rtt, (await both_cpu_s(self.conn) - before) / count

        return self.runner.run(timed())

    def close(self) -> None:
        async def close_here() -> None:  # on its own loop, whose futures it cancels
            self.conn.close()

        self.runner.run(close_here())
        self.ctx.destroy(linger=0)
        self.runner.close()


async def _running() -> str:
    return eventloop.running_loop()


def _one_size(parties: dict[str, _Party], nbytes: int, quick: bool) -> dict[str, Any]:
    message = Message(
        kind=Kind.FORWARD, meta={"reply": "echo"}, tensors={"act": torch.randn(nbytes // 4)}
    )
    for party in parties.values():  # warm-up
        party.block(message, 3)
    pairs, per_block, budget_s = _plan(quick, nbytes)
    rtt: dict[str, list[float]] = {loop: [] for loop in parties}
    cpu: dict[str, list[float]] = {loop: [] for loop in parties}
    deadline = time.monotonic() + budget_s
    for i in range(pairs):
        for loop in LOOPS if i % 2 == 0 else reversed(LOOPS):
            block_rtt, block_cpu = parties[loop].block(message, per_block)
            rtt[loop].append(block_rtt)
            cpu[loop].append(block_cpu)
        if i >= 3 and time.monotonic() > deadline:
            break
    return {
        "ratio": paired(rtt["uvloop"], rtt["asyncio"]),
        "cpu_ratio": paired(cpu["uvloop"], cpu["asyncio"]),
        "rtt_ms": {loop: median(t) * 1e3 for loop, t in rtt.items()},
        "cpu_ms": {loop: median(c) * 1e3 for loop, c in cpu.items()},
    }


def run(quick: bool = False) -> dict[str, Any]:
    before = os.environ.get(eventloop.ENV)
    children, parties = [], {}
    try:
        for loop in LOOPS:
            url = endpoint(free_port())
            ready, stop = CTX.Queue(), CTX.Event()
            children.append((start_child(peer_on, loop, url, ready, stop), stop))
            parties[loop] = _Party(loop, url, ready.get(timeout=60))
        if parties["uvloop"].kind != "uvloop":
            return {"event_loop_ratio": None, "event_loop_note": "uvloop is not installed"}
        sizes = {label: _one_size(parties, n, quick) for label, n in SIZES.items()}
    finally:
        for party in parties.values():
            party.close()
        for child, stop in children:
            stop.set()
            stop_child(child)
        if before is None:
            os.environ.pop(eventloop.ENV, None)
        else:
            os.environ[eventloop.ENV] = before
    return {
        "event_loop_clients_ran_on": {loop: party.kind for loop, party in parties.items()},
        "event_loop_ratio": {label: s["ratio"]["median"] for label, s in sizes.items()},
        "event_loop_ratio_spread": {label: s["ratio"] for label, s in sizes.items()},
        "event_loop_cpu_ratio": {label: s["cpu_ratio"]["median"] for label, s in sizes.items()},
        "event_loop_cpu_ratio_spread": {label: s["cpu_ratio"] for label, s in sizes.items()},
        "event_loop_rtt_ms": {label: s["rtt_ms"] for label, s in sizes.items()},
        "event_loop_cpu_ms_per_round_trip": {label: s["cpu_ms"] for label, s in sizes.items()},
    }
