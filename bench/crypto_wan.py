"""Encrypted vs plaintext round trips on a shaped link (``bench.shaper``), beside the
loopback ones of ``bench.crypto_rt``.

On loopback the round trip is a few milliseconds of CPU, so the cipher's passes weigh a
lot (``encryption_overhead`` there cannot reach 1.10 on two cores). The parties this product
is for talk over links of tens of milliseconds and ~100 Mbit/s; here the same client and
server (the real Channel, the workers' ZMTP listener) talk through the shaper at 20 ms RTT
and 100 Mbit/s (and 1 Gbit/s). Per link and size, plaintext and encrypted connections run
in interleaved blocks (order rotating, so no mode always goes first);
``encryption_overhead_wan[link][size]`` is the median of the encrypted/plain pair ratios,
with its quartiles in ``encryption_overhead_wan_spread``. For a message larger than one
chunk (2 MiB), a third connection seals it whole (one AEAD call, one frame):
``chunked_vs_whole_wan`` is chunked (envelope v2, the default chunk size: sealing chunk k+1
overlaps sending chunk k) over whole, and ``whole_overhead_wan`` whole over plaintext.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline import transport
from sl_pipeline.chunked import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.runtime import eventloop

from . import peers, shaper
from .common import CTX, endpoint, free_port, median, paired, start_child, stop_child
from .crypto_rt import connect, round_trips

KIB = 1024
SIZES = {"64KiB": 64 * KIB, "2MiB": 2 * 1024 * KIB}
# label: (round trip in seconds, bottleneck rate in bit/s), in both directions
LINKS = {"20ms_100Mbit": (0.020, 100e6), "20ms_1Gbit": (0.020, 1e9)}
CHUNK_BYTES = {"plain": DEFAULT_CHUNK_BYTES, "encrypted": DEFAULT_CHUNK_BYTES}
WHOLE = MAX_CHUNK_BYTES  # a chunk larger than the message: sealed in one piece
READY_S = 60.0


def _plan(quick: bool) -> tuple[int, float]:
    """(most pairs of blocks per link and size, time budget per link and size in seconds)."""
    return (8, 10.0) if quick else (24, 30.0)


def per_block(nbytes: int, rtt_s: float, rate_bit_s: float, quick: bool) -> int:
    """Round trips per block: about 0.1 s (0.25 s in full runs) of them, one at least."""
    round_trip_s = rtt_s + 2 * nbytes * 8 / rate_bit_s
    return max(1, round((0.1 if quick else 0.25) / round_trip_s))


def _message(tensor: torch.Tensor, chunk_bytes: int) -> Message:
    return Message(
        kind=Kind.FORWARD,
        meta={"reply": "echo", "chunk_bytes": chunk_bytes},  # the server replies alike
        tensors={"act": tensor},
    )


async def interleaved(
    conns: dict[str, DealerConnection], messages: dict[str, Message], count: int, quick: bool
) -> dict[str, list[float]]:
    """Per mode, the median round trip of each block; the modes' order rotates per pair."""
    pairs, budget_s = _plan(quick)
    modes = list(conns)
    blocks: dict[str, list[float]] = {mode: [] for mode in modes}
    deadline = time.monotonic() + budget_s
    for i in range(pairs):
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            blocks[mode].append(median(await round_trips(conns[mode], messages[mode], count)))
        if i >= 3 and time.monotonic() > deadline:
            break
    return blocks


async def one_size(
    conns: dict[str, DealerConnection], nbytes: int, link: tuple[float, float], quick: bool
) -> dict[str, Any]:
    """The ratios of one message size on the link as it is set now."""
    tensor = torch.randn(nbytes // 4)
    modes = [m for m in conns if m != "whole" or nbytes > DEFAULT_CHUNK_BYTES]
    chunking = CHUNK_BYTES | {"whole": WHOLE}
    messages = {mode: _message(tensor, chunking[mode]) for mode in modes}
    used = {mode: conns[mode] for mode in modes}
    for mode in modes:  # warm-up: buffers, first-touch pages, TCP's window
        await round_trips(used[mode], messages[mode], 1)
    blocks = await interleaved(used, messages, per_block(nbytes, *link, quick), quick)
    out: dict[str, Any] = {
        "overhead": paired(blocks["encrypted"], blocks["plain"]),
        "rtt_ms": {mode: median(t) * 1e3 for mode, t in blocks.items()},
    }
    if "whole" in blocks:
        out["chunked_vs_whole"] = paired(blocks["encrypted"], blocks["whole"])
        out["whole_overhead"] = paired(blocks["whole"], blocks["plain"])
    return out


async def measure(
    url: str,
    server_key: bytes,
    link: shaper.LinkSettings,
    quick: bool,
    sizes: dict[str, int],
    links: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    ctx = zmq.asyncio.Context()
    figures: dict[str, dict[str, Any]] = {}
    try:  # a failed connect must not leave a context for the garbage collector to hang on
        conns = {
            "plain": await connect(ctx, url, None, "wan-plain"),
            "encrypted": await connect(ctx, url, server_key, "wan-chunked"),
            "whole": await connect(ctx, url, server_key, "wan-whole"),
        }
        for mode, conn in conns.items():
            assert conn.channel is not None
            conn.channel.session.chunk_bytes = WHOLE if mode == "whole" else CHUNK_BYTES[mode]  # type: ignore[union-attr]
        for label, setting in links.items():
            link.set(*setting)
            figures[label] = {
                size: await one_size(conns, nbytes, setting, quick)
                for size, nbytes in sizes.items()
            }
    finally:
        link.set(0.0, 0.0)
        ctx.destroy(linger=0)
    return _summarise(figures, links)


def _summarise(
    figures: dict[str, dict[str, Any]], links: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    def pick(key: str, field: str | None = None) -> dict[str, dict[str, Any]]:
        return {
            label: {
                size: (row[key][field] if field else row[key])
                for size, row in by_size.items()
                if key in row
            }
            for label, by_size in figures.items()
        }

    return {
        "encryption_overhead_wan": pick("overhead", "median"),
        "encryption_overhead_wan_spread": pick("overhead"),
        "chunked_vs_whole_wan": pick("chunked_vs_whole", "median"),
        "chunked_vs_whole_wan_spread": pick("chunked_vs_whole"),
        "whole_overhead_wan": pick("whole_overhead", "median"),
        "whole_overhead_wan_spread": pick("whole_overhead"),
        "wan_rtt_ms": pick("rtt_ms"),
        "wan_links": {
            label: {
                "rtt_ms": rtt_s * 1e3,
                "rate_mbit_s": rate / 1e6,
                "chunk_bytes": DEFAULT_CHUNK_BYTES,
            }
            for label, (rtt_s, rate) in links.items()
        },
    }


def run(
    quick: bool = False,
    sizes: dict[str, int] | None = None,
    links: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Server child behind a shaper child; this process is the client."""
    lifted = transport.max_frame_bytes
    peers.unbounded_frames()  # the "whole" mode's one-frame messages, both ways
    server_url = endpoint(free_port())
    proxy_port = free_port()
    link = shaper.LinkSettings()
    ready, stop = CTX.Queue(), CTX.Event()
    server = start_child(peers.unbounded_channel_peer, server_url, ready, stop)
    proxy = start_child(
        shaper.serve, proxy_port, server_url.removeprefix("tcp://"), link, ready, stop
    )
    try:
        got = [ready.get(timeout=READY_S), ready.get(timeout=READY_S)]
        server_key = next(item for item in got if isinstance(item, bytes))
        return eventloop.run(
            measure(endpoint(proxy_port), server_key, link, quick, sizes or SIZES, links or LINKS)
        )
    finally:
        stop.set()
        stop_child(proxy)
        stop_child(server)
        transport.max_frame_bytes = lifted  # later sections get the workers' cap back


__all__ = ["LINKS", "SIZES", "run"]
