"""Split training over a WAN link: steps/s against the bound, by pipeline depth.

The real server worker (digits CNN) and the real :class:`ClientWorker` (driven through the
pipelined step loop, ``workers.client.microbatch.train_pipelined``, at depths 1, 2, 4, 8) talk
through ``bench.shaper``, a proxy on loopback that adds a round trip of 20, 40 and 50 ms and limits
each direction to 100 Mbit/s. The bound on steps/s at depth ``d`` and round trip ``RTT`` is
``min(compute, bandwidth, d / RTT)``: *compute* is steps/s through the proxy with no delay and
no rate limit at depth 8, *bandwidth* is the rate over the bytes per step of the busier
direction (counted by the proxy). That bound takes a step's latency to be the round trip
alone; one step in flight also waits for its bytes to cross the rate limit and for its own
compute, so ``pipelined_bound_steps_s`` is ``min(compute, bandwidth, d * steps_s(depth 1))``:
what perfect pipelining of the measured one-step latency gives. The recommended depth is
the smallest with ``d >= RTT * min(compute, bandwidth) + 1``, or 8: a step's reply comes
back one round trip plus one step's own time after it was sent, so that many steps must be
in flight to keep the slower side busy. Each round also runs a block with ``--pipeline-depth auto``
(``auto_depth``: the depths it chose; ``auto_steps_s``: its steps/s, probe included). Settings and
depths run in rounds, each round every setting in turn, so all see the same machine load;
each figure is the median over rounds.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq.asyncio

from sl_pipeline.config import ClientConfig, from_mapping
from sl_pipeline.data import batch_order
from sl_pipeline.messages import Kind, Message
from workers.client.microbatch import AUTO, train_pipelined
from workers.client.worker import ClientWorker

from . import shaper
from .common import CTX, endpoint, free_port, median, start_child, stop_child, stop_process
from .common import worker_process as start_worker
from .models import BATCH
from .overhead import configs

MODEL = "digits_cnn"
RTTS_MS = (20, 40, 50)
RATE_BIT_S = 100e6
DEPTHS = (1, 2, 4, 8)
TARGET_OF_BOUND = 0.8
TARGET_SPEEDUP = 3.0


def recommended_depth(rtt_s: float, steps_s: float) -> int:
    """The smallest depth that keeps ``steps_s`` steps per second going over ``rtt_s``:
    each step is in flight for a round trip plus its own ``1 / steps_s``."""
    for depth in DEPTHS:
        if depth >= rtt_s * steps_s + 1:
            return depth
    return DEPTHS[-1]


class Driver:
    """The client worker, stepping through its batches in pipelined blocks."""

    def __init__(self, client: ClientWorker, cfg: ClientConfig) -> None:
        self.client, self.cfg = client, cfg
        self.step = 0
        train = client.data.train
        assert train.y is not None
        self.x, self.y, self.ids = train.x, train.y, train.ids
        self.order = batch_order(len(train), BATCH, 0, 0)

    async def block(self, depth: int, steps: int) -> tuple[float, int]:
        """Steps per second of ``steps`` steps at ``depth`` (0: auto), and the depth used."""
        first = self.step

        def batches():  # type: ignore[no-untyped-def]
            for s in range(first, first + steps):
                idx = self.order[s % len(self.order)]
                yield s, self.x[idx], self.y[idx], self.ids[idx]

        self.client.cfg = replace(self.cfg, train=replace(self.cfg.train, pipeline_depth=depth))
        start = time.perf_counter()
        used = await train_pipelined(self.client, 0, batches(), lambda s, loss, t0: None)
        self.step += steps
        return steps / (time.perf_counter() - start), used


def _plan(quick: bool) -> tuple[int, int]:
    """(rounds, steps per block per unit of depth)."""
    return (3, 8) if quick else (5, 16)


async def measure(
    cfg: ClientConfig, base: Path, link: shaper.LinkSettings, quick: bool
) -> dict[str, Any]:
    rounds, per_depth = _plan(quick)
    client = ClientWorker(cfg, base, progress=False)
    client.ctx = zmq.asyncio.Context()
    driver = Driver(client, cfg)
    rates: dict[str, dict[int, list[float]]] = {
        f"{ms}ms": {d: [] for d in (*DEPTHS, AUTO)} for ms in RTTS_MS
    }
    chosen: dict[str, list[int]] = {f"{ms}ms": [] for ms in RTTS_MS}
    compute: list[float] = []
    per_step: list[tuple[float, float]] = []
    try:
        await client.connect()
        await driver.block(1, 10)  # warm-up
        for _ in range(rounds):
            link.set(0.0, 0.0)
            before, steps = link.carried(), 10 + per_depth * 8
            compute.append((await driver.block(8, steps))[0])
            after = link.carried()
            per_step.append(((after[0] - before[0]) / steps, (after[1] - before[1]) / steps))
            for ms in RTTS_MS:
                link.set(ms / 1000, RATE_BIT_S)
                for depth in (*DEPTHS, AUTO):  # AUTO: the client's own choice, probe included
                    rate, used = await driver.block(depth, 10 + per_depth * (depth or 8))
                    rates[f"{ms}ms"][depth].append(rate)
                    if depth == AUTO:
                        chosen[f"{ms}ms"].append(used)
        link.set(0.0, 0.0)
        assert client.conn is not None
        await client.conn.send(Message(kind=Kind.BYE, client=cfg.client.name))
    finally:
        if client.conn is not None:
            client.conn.close()
        client.ctx.term()
    return summarise(rates, chosen, median(compute), per_step)


def summarise(
    rates: dict[str, dict[int, list[float]]],
    chosen: dict[str, list[int]],
    compute: float,
    per_step: list[tuple[float, float]],
) -> dict[str, Any]:
    up, down = median([u for u, _ in per_step]), median([d for _, d in per_step])
    bandwidth = RATE_BIT_S / 8 / max(up, down)
    by_rtt: dict[str, Any] = {}
    for label, by_depth in rates.items():
        rtt_s = float(label.removesuffix("ms")) / 1000
        steps_s = {d: median(by_depth[d]) for d in DEPTHS}
        bound = {d: min(compute, bandwidth, d / rtt_s) for d in DEPTHS}
        # d steps in flight can at best do d times what one step in flight does: a step
        # spends more than the round trip on the link (its bytes take time to send, and its
        # compute runs before its reply), and no depth removes that from its own latency.
        piped = {d: min(compute, bandwidth, d * steps_s[1]) for d in DEPTHS}
        best = recommended_depth(rtt_s, min(compute, bandwidth))
        by_rtt[label] = {
            "steps_s": steps_s,
            "bound_steps_s": bound,
            "of_bound": {d: steps_s[d] / bound[d] for d in DEPTHS},
            "pipelined_bound_steps_s": piped,
            "of_pipelined_bound": {d: steps_s[d] / piped[d] for d in DEPTHS},
            "step_latency_ms": 1e3 / steps_s[1],
            "recommended_depth": best,
            "recommended_of_bound": steps_s[best] / bound[best],
            "recommended_of_pipelined_bound": steps_s[best] / piped[best],
            "recommended_speedup_over_depth_1": steps_s[best] / steps_s[1],
            "auto_depth": chosen[label],
            "auto_steps_s": median(by_depth[AUTO]),
        }
    at40 = by_rtt.get("40ms", {})
    return {
        "wan": {
            "model": MODEL,
            "rate_mbit_s": RATE_BIT_S / 1e6,
            "compute_bound_steps_s": compute,
            "bytes_per_step": {"up": up, "down": down},
            "bandwidth_bound_steps_s": bandwidth,
            "by_rtt": by_rtt,
            "targets": {"of_bound": TARGET_OF_BOUND, "speedup_over_depth_1": TARGET_SPEEDUP},
        },
        "wan_40ms_of_bound": at40.get("recommended_of_bound"),
        "wan_40ms_of_pipelined_bound": at40.get("recommended_of_pipelined_bound"),
        "wan_40ms_speedup": at40.get("recommended_speedup_over_depth_1"),
    }


def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sl-bench-wan-") as tmp:
        folder = Path(tmp)
        server_toml, client_map = configs(folder, MODEL)
        target = client_map["client"]["server"].removeprefix("tcp://")
        proxy_port = free_port()
        client_map["client"]["server"] = endpoint(proxy_port)
        link = shaper.LinkSettings()
        ready, stop = CTX.Queue(), CTX.Event()
        proxy = start_child(shaper.serve, proxy_port, target, link, ready, stop)
        server = start_worker("server", server_toml, folder / "server.log")
        try:
            ready.get(timeout=60)
            cfg = from_mapping(ClientConfig, client_map)
            return asyncio.run(measure(cfg, folder, link, quick))
        finally:
            stop_process(server)
            stop.set()
            stop_child(proxy)


__all__ = ["recommended_depth", "run"]
