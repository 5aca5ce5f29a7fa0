"""Split training over a WAN link: steps/s against the bound, by pipeline depth.

The real server worker (digits CNN) and the real :class:`ClientWorker` (driven through the
pipelined step loop, ``workers.client.microbatch.train_pipelined``, at depths 1, 2, 4, 8, 16)
talk through ``bench.shaper``, a proxy on loopback that adds a round trip of 20, 40 and 50 ms
and limits each direction to 100 Mbit/s. The bound on steps/s at depth ``d`` and round trip
``RTT`` is ``min(compute, bandwidth, d / RTT)``: *compute* is steps/s through the proxy with no
delay and no rate limit at depth 16, *bandwidth* is the rate over the bytes per step of the
busier direction (counted by the proxy). That bound takes a step's latency to be the round
trip alone; one step in flight also waits for its bytes to cross the rate limit and for its
own compute, so ``pipelined_bound_steps_s`` is ``min(compute, bandwidth, d * steps_s(depth 1))``:
what perfect pipelining of the measured one-step latency gives. The recommended depth is the
smallest with ``d >= latency(depth 1) * min(compute, bandwidth) + 1`` (Little's law on the
measured one-step latency, plus the step being computed), or 16.

A block's steps/s counts from its first applied step to its last (the steady rate: filling
the pipeline costs one latency per block here, once per epoch in training). Each round, for
each round trip in turn, measures every depth, deepest first, and a block with
``--pipeline-depth auto`` (``auto_depth``: the depths it chose; ``auto_steps_s``: its steps/s,
probe included), and the compute bound just before and just after the deepest block (the
mean of the two is that round's). Every ratio to the bound is the median over rounds of that
round's block over the bound from that round's compute (``of_bound_spread``: quartiles).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq.asyncio

from sl_pipeline.config import ClientConfig, from_mapping
from sl_pipeline.data import batch_order
from sl_pipeline.messages import Kind, Message
from workers.client.microbatch import AUTO, train_pipelined
from workers.client.worker import ClientWorker
from workers.runtime import eventloop

from . import shaper
from .common import CTX, endpoint, free_port, median, paired, start_child, stop_child, stop_process
from .common import worker_process as start_worker
from .models import BATCH
from .overhead import configs

MODEL = "digits_cnn"
RTTS_MS = (20, 40, 50)
RATE_BIT_S = 100e6
DEPTHS = (1, 2, 4, 8, 16)
TARGET_OF_BOUND = 0.8
TARGET_SPEEDUP = 3.0


def recommended_depth(step_s: float, steps_s: float) -> int:
    """The smallest depth that keeps ``steps_s`` steps per second going when one step, alone
    in flight, takes ``step_s`` from its forward to its applied gradient (Little's law:
    ``step_s * steps_s`` in flight), plus the one being computed."""
    for depth in DEPTHS:
        if depth >= step_s * steps_s + 1:
            return depth
    return DEPTHS[-1]


@dataclass(frozen=True)
class Block:
    """One block of steps at one depth: its steady rate, and how long each step took."""

    steps_s: float  # steps applied per second from the first applied to the last
    latency_s: float  # median time from a step's forward to its gradient applied
    depth: int  # the depth used (auto: the one it chose)


class Driver:
    """The client worker, stepping through its batches in pipelined blocks."""

    def __init__(self, client: ClientWorker, cfg: ClientConfig) -> None:
        self.client, self.cfg = client, cfg
        self.step = 0
        train = client.data.train
        assert train.y is not None
        self.x, self.y, self.ids = train.x, train.y, train.ids
        self.order = batch_order(len(train), BATCH, 0, 0)

    async def block(self, depth: int, steps: int) -> Block:
        """``steps`` steps at ``depth`` (0: auto). The rate counts from the first step
        applied, so the one-off filling of the pipeline (a round trip before anything comes
        back) is not spread over the block: a training run fills it once per epoch."""
        first = self.step
        applied: list[float] = []
        latencies: list[float] = []

        def batches():  # type: ignore[no-untyped-def]
            for s in range(first, first + steps):
                idx = self.order[s % len(self.order)]
                yield s, self.x[idx], self.y[idx], self.ids[idx]

        def done(step: int, loss: float, started: float) -> None:
            applied.append(now := time.perf_counter())
            latencies.append(now - started)

        self.client.cfg = replace(self.cfg, train=replace(self.cfg.train, pipeline_depth=depth))
        used = await train_pipelined(self.client, 0, batches(), done)
        self.step += steps
        rate = (len(applied) - 1) / (applied[-1] - applied[0])
        return Block(rate, median(latencies), used)


def _plan(quick: bool) -> tuple[int, int]:
    """(rounds, steps per block per unit of depth). The deepest block's share of the bound
    varied 0.84-1.06 from round to round (quartiles) on the quiet 2-core host, so 5 quick
    rounds left three runs 13 % apart at 40 ms: quick takes 9."""
    return (9, 8) if quick else (9, 16)


class Rounds:
    """Every block's figures, by round trip and depth, in the order measured."""

    def __init__(self) -> None:
        labels = [f"{ms}ms" for ms in RTTS_MS]
        self.steps_s: dict[str, dict[int, list[float]]] = {
            k: {d: [] for d in (*DEPTHS, AUTO)} for k in labels
        }
        self.latency_s: dict[str, dict[int, list[float]]] = {
            k: {d: [] for d in DEPTHS} for k in labels
        }
        # the compute bound, measured in each round around that round trip's deepest block
        self.compute: dict[str, list[float]] = {k: [] for k in labels}
        self.chosen: dict[str, list[int]] = {k: [] for k in labels}
        self.per_step: list[tuple[float, float]] = []  # bytes per step, up and down


async def _compute(driver: Driver, link: shaper.LinkSettings, per_depth: int, out: Rounds) -> float:
    """Steps/s at the deepest depth with no delay and no rate limit, and the bytes per step."""
    link.set(0.0, 0.0)
    before, steps = link.carried(), 10 + per_depth * DEPTHS[-1]
    rate = (await driver.block(DEPTHS[-1], steps)).steps_s
    after = link.carried()
    out.per_step.append(((after[0] - before[0]) / steps, (after[1] - before[1]) / steps))
    return rate


async def _round(driver: Driver, link: shaper.LinkSettings, per_depth: int, out: Rounds) -> None:
    """One round: for each round trip, every depth (deepest first) and auto; the compute bound
    is measured just before and just after the deepest block, whose ratio to it is the most
    sensitive to machine load (both are CPU-bound), and the round uses their mean."""
    for ms in RTTS_MS:
        label = f"{ms}ms"
        compute = [await _compute(driver, link, per_depth, out)]
        for depth in (*reversed(DEPTHS), AUTO):  # AUTO: the client's own choice, probe included
            link.set(ms / 1000, RATE_BIT_S)
            block = await driver.block(depth, 10 + per_depth * (depth or 8))
            if depth == DEPTHS[-1]:
                compute.append(await _compute(driver, link, per_depth, out))
            out.steps_s[label][depth].append(block.steps_s)
            if depth == AUTO:
                out.chosen[label].append(block.depth)
            else:
                out.latency_s[label][depth].append(block.latency_s)
        out.compute[label].append(sum(compute) / len(compute))


async def measure(
    cfg: ClientConfig, base: Path, link: shaper.LinkSettings, quick: bool
) -> dict[str, Any]:
    rounds, per_depth = _plan(quick)
    client = ClientWorker(cfg, base, progress=False)
    client.ctx = zmq.asyncio.Context()
    driver = Driver(client, cfg)
    out = Rounds()
    try:
        await client.connect()
        await driver.block(1, 10)  # warm-up
        for _ in range(rounds):
            await _round(driver, link, per_depth, out)
        link.set(0.0, 0.0)
        assert client.conn is not None
        await client.conn.send(Message(kind=Kind.BYE, client=cfg.client.name))
    finally:
        if client.conn is not None:
            client.conn.close()
        client.ctx.term()
    return summarise(out)


def _setting(label: str, out: Rounds, bandwidth: float) -> dict[str, Any]:
    rtt_s = float(label.removesuffix("ms")) / 1000
    rates, computes = out.steps_s[label], out.compute[label]
    compute = median(computes)
    steps_s = {d: median(rates[d]) for d in DEPTHS}
    latency = {d: median(out.latency_s[label][d]) for d in DEPTHS}
    bound = {d: min(compute, bandwidth, d / rtt_s) for d in DEPTHS}
    # d steps in flight can at best do d times what one step in flight does: a step
    # spends more than the round trip on the link (its bytes take time to send, and its
    # compute runs before its reply), and no depth removes that from its own latency.
    piped = {d: min(compute, bandwidth, d * steps_s[1]) for d in DEPTHS}
    # each round's blocks over the bound from the compute measured in that same round
    of_bound = {
        d: paired(rates[d], [min(c, bandwidth, d / rtt_s) for c in computes]) for d in DEPTHS
    }
    best = recommended_depth(latency[1], min(compute, bandwidth))
    return {
        "steps_s": steps_s,
        "compute_bound_steps_s": compute,
        "bound_steps_s": bound,
        "of_bound": {d: of_bound[d]["median"] for d in DEPTHS},
        "of_bound_spread": of_bound,
        "pipelined_bound_steps_s": piped,
        "of_pipelined_bound": {d: steps_s[d] / piped[d] for d in DEPTHS},
        "step_latency_ms": {d: 1e3 * latency[d] for d in DEPTHS},
        "recommended_depth": best,
        "recommended_of_bound": of_bound[best]["median"],
        "recommended_of_pipelined_bound": steps_s[best] / piped[best],
        "recommended_speedup_over_depth_1": paired(rates[best], rates[1])["median"],
        "auto_depth": out.chosen[label],
        "auto_steps_s": median(rates[AUTO]),
    }


def summarise(out: Rounds) -> dict[str, Any]:
    up, down = median([u for u, _ in out.per_step]), median([d for _, d in out.per_step])
    bandwidth = RATE_BIT_S / 8 / max(up, down)
    by_rtt = {label: _setting(label, out, bandwidth) for label in out.steps_s if out.compute[label]}
    at40 = by_rtt.get("40ms", {})
    return {
        "wan": {
            "model": MODEL,
            "rate_mbit_s": RATE_BIT_S / 1e6,
            "compute_bound_steps_s": median([c for cs in out.compute.values() for c in cs]),
            "bytes_per_step": {"up": up, "down": down},
            "bandwidth_bound_steps_s": bandwidth,
            "by_rtt": by_rtt,
            "targets": {"of_bound": TARGET_OF_BOUND, "speedup_over_depth_1": TARGET_SPEEDUP},
        },
        "wan_40ms_of_bound": at40.get("recommended_of_bound"),
        "wan_40ms_of_pipelined_bound": at40.get("recommended_of_pipelined_bound"),
        "wan_40ms_speedup": at40.get("recommended_speedup_over_depth_1"),
        "wan_40ms_depth": at40.get("recommended_depth"),
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
            return eventloop.run(measure(cfg, folder, link, quick))
        finally:
            stop_process(server)
            stop.set()
            stop_child(proxy)


__all__ = ["recommended_depth", "run"]
