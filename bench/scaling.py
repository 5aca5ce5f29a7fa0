"""Many clients against one server: aggregate steps/s, and server memory per client.

The server is the real worker process (``python -m workers server``, digits CNN). Clients
are asyncio tasks in this process, each with its own DEALER connection, key and Noise IK
handshake, sending precomputed cut-layer activations and labels back to back (no client
compute, so the server is the bottleneck). With one client that is the server's
single-client throughput limit; ``efficiency_64`` = steps/s with 64 clients / that limit, the
median of ratios taken from windows run back to back (1, 4, 16, 64 clients, then again).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline.config import ModelConfig, from_mapping
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import load_keypair, load_public_key
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.models import build_segments, fingerprint
from sl_pipeline.transport import DealerConnection
from workers.runtime import eventloop

from .common import (
    endpoint,
    free_port,
    listening_worker,
    median,
    rss_mib,
    stop_process,
    to_toml,
    write_keys,
)
from .models import BATCH, MODELS, TRAIN

MODEL = "digits_cnn"
TIMEOUT_S = 30.0
MAX_CLIENTS = 64


class Fleet:
    """Up to ``MAX_CLIENTS`` authenticated connections to one server."""

    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.ctx = zmq.asyncio.Context()
        self.conns: list[DealerConnection] = []
        self.steps: list[int] = []
        self.model = from_mapping(ModelConfig, MODELS[MODEL])
        bottom = build_segments(self.model, "vanilla")[0]
        with torch.no_grad():
            self.act = bottom(torch.rand(BATCH, *self.model.in_shape))
        self.labels = torch.randint(0, self.model.classes, (BATCH,))

    async def grow(self, count: int) -> None:
        """Connect and authenticate clients until ``count`` are joined."""
        server_key = load_public_key(self.folder / "keys" / "server.pub")
        while len(self.conns) < count:
            name = f"bench-{len(self.conns) + 1}"
            hello = {
                "v": PROTOCOL_VERSION,
                "client": name,
                "role": "trainer",
                "model": fingerprint(self.model, "vanilla"),
            }
            static = load_keypair(self.folder / "keys" / f"{name}.key")
            conn = DealerConnection(self.ctx, self.url)
            self.conns.append(conn)
            self.steps.append(0)
            await conn.handshake(ClientHandshake(hello, static, server_key), TIMEOUT_S)

    async def _drive(self, i: int, until: float) -> int:
        conn, done = self.conns[i], 0
        while time.monotonic() < until:
            self.steps[i] += 1
            await conn.send(
                Message(
                    kind=Kind.FORWARD,
                    step=self.steps[i],
                    tensors={"act": self.act, "labels": self.labels},
                )
            )
            await conn.recv(TIMEOUT_S)
            done += 1
        return done

    async def window(self, active: int, seconds: float) -> float:
        """Aggregate steps/s of the first ``active`` clients over one time window."""
        start = time.monotonic()
        counts = await asyncio.gather(*(self._drive(i, start + seconds) for i in range(active)))
        return sum(counts) / (time.monotonic() - start)

    async def close(self) -> None:
        for conn in self.conns:
            if conn.channel is not None:
                await conn.send(Message(kind=Kind.BYE))
            conn.close()
        self.ctx.term()


def write_server(folder: Path) -> tuple[Path, str]:
    keys = write_keys(folder, [f"bench-{i + 1}" for i in range(MAX_CLIENTS)])
    url = endpoint(free_port())
    server = {
        "server": {
            "bind": url,
            "key": keys["server_key"],
            "admitted": keys["admitted"],
            "max_clients": MAX_CLIENTS,
        },
        "model": MODELS[MODEL],
        "train": TRAIN,
        "ops": {"log_level": "WARNING"},
    }
    (folder / "server.toml").write_text(to_toml(server))
    return folder / "server.toml", url


async def throughput(
    fleet: Fleet, counts: list[int], repeats: int, window_s: float
) -> tuple[dict[str, float], float]:
    """Median steps/s per client count, and the median of the paired ratios
    (largest count / one client) from windows run back to back in the same round.

    Every client joins first; rounds then cycle through the counts (1, 4, 16, 64, 1, ...)
    so each count sees the same machine load, and idle clients cost the server nothing.
    """
    await fleet.grow(max(counts))
    await fleet.window(1, 1.0)  # warm-up: the server's first steps allocate
    rates: dict[int, list[float]] = {count: [] for count in counts}
    ratios = []
    for _ in range(repeats):
        for count in counts:
            rates[count].append(await fleet.window(count, window_s))
        ratios.append(rates[max(counts)][-1] / rates[1][-1])
    return {str(c): median(r) for c, r in rates.items()}, median(ratios)


async def memory(fleet: Fleet, pid: int, idle: int) -> dict[str, float]:
    await fleet.grow(1)
    await fleet.window(1, 1.0)
    before = rss_mib(pid)
    await fleet.grow(1 + idle)
    await asyncio.sleep(0.5)
    after = rss_mib(pid)
    return {
        "rss_before_mib": before,
        "rss_after_mib": after,
        "idle_clients": idle,
        "per_client_mib": (after - before) / idle,
    }


async def _with_server(job: str, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sl-bench-") as tmp:
        folder = Path(tmp)
        config, url = write_server(folder)
        server = listening_worker("server", config, folder / "server.log", url)
        fleet = Fleet(folder, url)
        try:
            if job == "memory":
                return await memory(fleet, server.pid, 16 if quick else MAX_CLIENTS - 1)
            counts = [1, 4, 16] if quick else [1, 4, 16, 64]
            repeats, window_s = (2, 1.5) if quick else (3, 3.0)
            table, paired = await throughput(fleet, counts, repeats, window_s)
            return {"table": table, "paired_ratio": paired}
        finally:
            await fleet.close()
            stop_process(server)


def run(quick: bool = False) -> dict[str, Any]:
    result = eventloop.run(_with_server("throughput", quick))
    table = result["table"]
    mem = eventloop.run(_with_server("memory", quick))
    efficiency = result["paired_ratio"] if "64" in table else None
    return {
        "scaling": table,
        "efficiency_64": efficiency,
        "server_mem_per_client_mib": mem["per_client_mib"],
        "server_memory": mem,
        "scaling_note": "64 clients skipped in --quick" if efficiency is None else "",
    }
