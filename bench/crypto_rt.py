"""Encrypted vs plaintext round trip through the real Channel over loopback TCP.

The parent process is the client (:class:`DealerConnection`); a child process is the
server (``peers.channel_peer``). Each round trip is encode+seal -> send -> open+decode ->
a reply of the same size -> open+decode. Plaintext (PlainSession) and encrypted (Noise IK
session) connections run side by side in interleaved blocks of round trips, so all see the
same machine load; a ratio is the median of the pair ratios. ``encryption_overhead`` is the
default suite's (the first of ``DEFAULT_CIPHERS``: what a user gets);
``encryption_overhead_by_cipher`` has every suite's, each on its own connection.
Beside the wall-clock ratio, ``encryption_cpu_ratio`` is the same ratio of the CPU time both
processes spent (all their threads), which waiting for a busy core does not inflate, and
``aead_gb_s`` the ciphers' own speed on one core (hot 2 MiB buffer, no I/O), and
``aead_gil`` whether sealing releases the GIL (so could run in a thread beside Python work).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import zmq.asyncio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3, ChaCha20Poly1305

from sl_pipeline.ciphers import DEFAULT_CIPHERS, SUITES
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.runtime import eventloop

from . import peers
from .common import CTX, endpoint, free_port, median, paired, start_child, stop_child

SIZES = {"4KiB": 4 * 1024, "64KiB": 64 * 1024, "2MiB": 2 * 1024 * 1024}
GOAL_2MIB = 1.10
TIMEOUT_S = 30.0


class _UngatedHandshake(ClientHandshake):
    """The bench's server has no connection gate (it admits any key), so a keyed client
    offers no gate token: the gate costs once per connection, never per message."""

    def connect_token(self, now_s: float) -> bytes | None:
        return None


async def connect(
    ctx: zmq.asyncio.Context,
    url: str,
    server_key: bytes | None,
    name: str,
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS,
) -> DealerConnection:
    """A joined connection: Noise IK when ``server_key`` is given (offering ``ciphers``),
    plaintext otherwise."""
    conn = DealerConnection(ctx, url)
    static = generate_keypair() if server_key is not None else None
    handshake = _UngatedHandshake({"client": name}, static, server_key, ciphers=ciphers)
    await conn.handshake(handshake, TIMEOUT_S)
    return conn


async def round_trips(conn: DealerConnection, message: Message, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await conn.send(message)
        await conn.recv(TIMEOUT_S)
        samples.append(time.perf_counter() - start)
    return samples


def _plan(quick: bool, nbytes: int = 0) -> tuple[int, int, float]:
    """(pairs of blocks, round trips per block, time budget per size in seconds). At 2 MiB
    the pair ratios' quartiles were 0.3-0.4 apart, so 40 pairs left the median's own noise
    near 5 % and three quick runs 26 % apart (docs/performance.md): three times the pairs.
    With 120, three quiet runs were still 9.9 % apart (quartiles [1.10-1.53]: a median's
    own noise about 3 %), so quick takes 240 (about 10 s more on a quiet machine). At 64 KiB
    the quartiles were 0.6 apart on this host (three quick runs 27 % apart with 40 pairs);
    its round trips take well under a millisecond, so 400 pairs of 8 cost a few seconds."""
    if quick:
        return (240, 4, 30.0) if nbytes >= 1024 * 1024 else (400, 8, 10.0)
    return (120, 8, 40.0) if nbytes >= 1024 * 1024 else (600, 8, 20.0)


_CPU_QUERY = Message(kind=Kind.FORWARD, meta={"reply": "cpu"})


async def both_cpu_s(conn: DealerConnection) -> float:
    """CPU seconds so far of this process plus the server's (asked over ``conn``)."""
    await conn.send(_CPU_QUERY)
    reply = await conn.recv(TIMEOUT_S)
    return time.process_time() + float(reply.meta["cpu_s"])


async def paired_blocks(
    conns: dict[str, DealerConnection],
    messages: dict[str, Message],
    quick: bool,
    nbytes: int = 0,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per block: the median round trip, and the CPU seconds per round trip of both
    processes. Blocks of the two modes are interleaved; the order inside a pair alternates
    (AB, BA, ...) so neither mode always runs first."""
    pairs, per_block, budget_s = _plan(quick, nbytes)
    medians: dict[str, list[float]] = {mode: [] for mode in conns}
    cpu: dict[str, list[float]] = {mode: [] for mode in conns}
    deadline = time.monotonic() + budget_s
    for i in range(pairs):
        order = list(conns) if i % 2 == 0 else list(reversed(conns))
        for mode in order:
            before = await both_cpu_s(conns[mode])
            medians[mode].append(median(await round_trips(conns[mode], messages[mode], per_block)))
            cpu[mode].append((await both_cpu_s(conns[mode]) - before) / per_block)
        if i >= 3 and time.monotonic() > deadline:
            break
    return medians, cpu


def aead_gb_s(nbytes: int = 2 * 1024 * 1024, repeats: int = 40) -> dict[str, float]:
    """Sealing speed of each AEAD on one core: GB/s, best of ``repeats`` (a hot buffer)."""
    data, nonce = os.urandom(nbytes), bytes(12)
    out = bytearray(nbytes + 16)
    speeds = {}
    suites = (("aes256gcm", AESGCM, 32), ("aes128ocb3", AESOCB3, 16))
    for name, cipher, key_bytes in (*suites, ("chacha20poly1305", ChaCha20Poly1305, 32)):
        aead = cipher(os.urandom(key_bytes))
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            aead.encrypt_into(nonce, data, None, out)
            samples.append(time.perf_counter() - start)
        speeds[name] = nbytes / min(samples) / 1e9
    return speeds


def aead_gil(nbytes: int = 2 * 1024 * 1024, calls: int = 30) -> dict[str, float]:
    """Does sealing release the GIL? A pure-Python thread counts while this one seals:
    its rate against its rate while this one sleeps (near 1: released; near 0: held), and
    what a seal then takes, against a seal alone (the GIL handed back costs a switch)."""
    aead, data, out = AESGCM(os.urandom(32)), os.urandom(nbytes), bytearray(nbytes + 16)

    def seal_s() -> float:
        start = time.perf_counter()
        aead.encrypt_into(bytes(12), data, None, out)
        return time.perf_counter() - start

    alone = median([seal_s() for _ in range(calls)])
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        first, start = count[0], time.perf_counter()
        time.sleep(0.2)
        idle_rate = (count[0] - first) / (time.perf_counter() - start)
        first, start = count[0], time.perf_counter()
        for _ in range(calls):
            seal_s()
        beside = (time.perf_counter() - start) / calls  # the mean: GIL waits included
        busy_rate = (count[0] - first) / (beside * calls)
    finally:
        stop.set()
        spinner.join()
    return {
        "spinner_rate_while_sealing": busy_rate / idle_rate,
        "seal_ms_alone": alone * 1e3,  # median
        "seal_ms_beside_a_python_thread": beside * 1e3,  # mean
    }


async def measure(
    url: str, server_key: bytes, quick: bool, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    ctx = zmq.asyncio.Context()
    result: dict[str, Any] = {
        "rtt_ms": {},
        "cpu_ms_per_round_trip": {},
        "cipher": DEFAULT_CIPHERS[0],
        "encryption_overhead_by_cipher": {name: {} for name in SUITES},
        "aead_gb_s": aead_gb_s(),
        "aead_gil": aead_gil(),
    }
    for key in ENCRYPTION_FIGURES:
        result[key] = {}
    try:  # a failed connect must not leave a context for the garbage collector to hang on
        conns = {"plain": await connect(ctx, url, None, "bench-plain")}
        for name in SUITES:
            conns[name] = await connect(ctx, url, server_key, f"bench-{name}", (name,))
        for label, nbytes in (sizes or SIZES).items():
            await _one_size(conns, label, nbytes, quick, result)
    finally:
        ctx.destroy(linger=0)
    result["goal_2MiB"] = GOAL_2MIB
    if "2MiB" in result["encryption_overhead"]:
        result["goal_met"] = result["encryption_overhead"]["2MiB"] <= GOAL_2MIB
    return result


ENCRYPTION_FIGURES = (
    "encryption_overhead",
    "encryption_overhead_spread",
    "encryption_cpu_ratio",
    "encryption_cpu_ratio_spread",
)


async def _one_size(
    conns: dict[str, DealerConnection], label: str, nbytes: int, quick: bool, result: Any
) -> None:
    message = Message(
        kind=Kind.FORWARD, meta={"reply": "echo"}, tensors={"act": torch.randn(nbytes // 4)}
    )
    for conn in conns.values():  # warm-up: buffers, first-touch pages
        await round_trips(conn, message, 3)
    blocks, cpu = await paired_blocks(conns, dict.fromkeys(conns, message), quick, nbytes)
    for name in SUITES:
        spread = paired(blocks[name], blocks["plain"])
        result["encryption_overhead_by_cipher"][name][label] = spread["median"]
        if name == result["cipher"]:
            cpu_spread = paired(cpu[name], cpu["plain"])
            result["encryption_overhead"][label] = spread["median"]
            result["encryption_overhead_spread"][label] = spread
            result["encryption_cpu_ratio"][label] = cpu_spread["median"]
            result["encryption_cpu_ratio_spread"][label] = cpu_spread
    result["cpu_ms_per_round_trip"][label] = {m: median(c) * 1e3 for m, c in cpu.items()}
    rtt = {mode: median(t) * 1e3 for mode, t in blocks.items()}
    result["rtt_ms"][label] = rtt | {"samples": len(blocks["plain"])}


def run(
    quick: bool = False, sizes: dict[str, int] | None = None, wan: bool = True
) -> dict[str, Any]:
    """Loopback figures, then (``wan``) the same round trips on a shaped link (``crypto_wan``)."""
    result = _loopback(quick, sizes)
    if wan:
        from . import crypto_wan  # imports this module: not at the top

        result |= crypto_wan.run(quick)
    return result


def _loopback(quick: bool, sizes: dict[str, int] | None) -> dict[str, Any]:
    url = endpoint(free_port())
    ready, stop = CTX.Queue(), CTX.Event()
    child = start_child(peers.channel_peer, url, ready, stop)
    try:
        server_key = ready.get(timeout=60)
        return eventloop.run(measure(url, server_key, quick, sizes))
    finally:
        stop.set()
        stop_child(child)
