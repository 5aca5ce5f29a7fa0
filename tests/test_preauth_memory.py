"""What a peer can make a worker buffer before any check (issue 15, B3 and B4).

The server and relay read ZMTP themselves (``sl_pipeline.zmtp``): every frame header is
checked against the caps before its body is read: a stranger's handshake (4 KiB), a frame
(about one chunk), and the frames and bytes of one message (what sl-pipeline legitimately
sends, ``zmtp.caps_for``). These tests measure a real server process's resident memory
(``/proc/PID/status``) while strangers speaking raw ZMTP, and an admitted key, send frames
of hundreds of MiB and messages of hundreds of frames. ``SL_PREAUTH_FRAME_MIB=100`` runs the
issue's 12 x 100 MB figure (16 MiB frames by default); ``SL_ATTACK_FRAMES=600`` the admitted
600 x 1 MiB message (64 frames by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.errors import SLError
from sl_pipeline.models import fingerprint
from sl_pipeline.transport import max_frame_bytes
from sl_pipeline.zmtp import HANDSHAKE_BYTES, SCRATCH_BYTES, caps_for
from workers.client.worker import ClientWorker

from .conftest import load_client, load_server
from .test_hostile_peers import _ready, _status_kib, join

MIB = 1024 * 1024
FRAME_MIB = int(os.environ.get("SL_PREAUTH_FRAME_MIB", "16"))
ATTACK_FRAMES = int(os.environ.get("SL_ATTACK_FRAMES", "64"))
CEILING = 64 * MIB
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")

# ZMTP 3.0 greeting (RFC 23): signature, version 3.0, mechanism PLAIN, as-server 0, filler
GREETING = b"\xff" + bytes(7) + b"\x01\x7f" + b"\x03\x00" + b"PLAIN".ljust(20, b"\x00")
GREETING += b"\x00" + bytes(31)
LONG, MORE, COMMAND = 0x02, 0x01, 0x04


def _raw_zmtp_stranger(host: str, port: int, frames: int, frame_bytes: int) -> int:
    """A stranger speaking raw ZMTP: the greeting, then ``frames`` long frames (the first a
    handshake command, all but the last flagged MORE). Returns the bytes the server took
    before it closed the connection."""
    body = memoryview(bytes(frame_bytes))
    sent = 0
    with socket.create_connection((host, port), timeout=20) as sock:
        try:
            sock.sendall(GREETING)
            for index in range(frames):
                flags = LONG | (COMMAND if index == 0 else 0) | (MORE if index < frames - 1 else 0)
                sock.sendall(struct.pack(">BQ", flags, frame_bytes))
                for start in range(0, frame_bytes, MIB):
                    sent += sock.send(body[start : start + MIB])
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server closed the connection: what we want
    return sent


def _rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def _restart_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM counts from here


async def _falls_back(pid: int, before: int, timeout_s: float = 20.0) -> int:
    """Poll (bounded) until the server's resident size is back within the ceiling."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (rss := _rss(pid)) - before > CEILING and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return rss


async def _server(deployment: Any, procs: Any) -> tuple[Any, Any, dict[str, Path]]:
    files = deployment(clients=1, dataset="breast_cancer", ops=True)
    cfg = load_server(files["server"])
    # forked (tests/workerproc.py): a torch import less; its memory is under test, not its start
    proc = procs.fork("server", files["server"])
    await _ready(cfg.ops.listen, proc)
    return cfg, proc, files


def test_the_frame_cap_is_about_one_chunk() -> None:
    # The socket limit the tests below rely on: a chunk (1 MiB) plus its tag and some slack
    assert MIB < max_frame_bytes(DEFAULT_LIMITS) <= MIB + 8192


async def test_a_strangers_raw_zmtp_frames_cost_the_server_at_most_64_mib(
    deployment, procs
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a real keyed server process and its resident size once ready
    cfg, proc, _ = await _server(deployment, procs)
    host, port = cfg.server.bind.removeprefix("tcp://").rsplit(":", 1)
    before = _rss(proc.pid)
    _restart_peak(proc.pid)
    # Execute: 12 strangers at once, each a 12-frame message of FRAME_MIB per frame, no key
    with ThreadPoolExecutor(12) as pool:
        jobs = [
            pool.submit(_raw_zmtp_stranger, host, int(port), 12, FRAME_MIB * MIB) for _ in range(12)
        ]
        taken = [await asyncio.wrap_future(job) for job in jobs]
    peak = _status_kib(proc.pid, "VmHWM") * 1024
    after = await _falls_back(proc.pid, before)
    # Assert: the peak and the resident size stay within 64 MiB; the server still serves
    print(
        f"12 strangers x 12 x {FRAME_MIB} MiB raw ZMTP: server RSS {before / MIB:.0f} MiB -> "
        f"peak {peak / MIB:.0f} -> {after / MIB:.0f}; the server took {max(taken) / MIB:.1f} MiB "
        "from the greediest"
    )
    assert peak - before <= CEILING and after - before <= CEILING
    await _ready(cfg.ops.listen, proc)


async def test_an_admitted_keys_huge_frames_are_dropped_unbuffered(deployment, procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a real server and an admitted client's connection, made by hand
    cfg, proc, files = await _server(deployment, procs)
    base = files["server"].parent
    ctx = zmq.asyncio.Context()
    try:
        # what a hello must name (the server process holds the checkpoint dir: no 2nd worker)
        model = fingerprint(cfg.model, cfg.server.topology)
        conn = await join(cfg.server.bind, model, base / "keys", ctx)
        before = _rss(proc.pid)
        _restart_peak(proc.pid)
        huge = bytes(250 * MIB)  # calloc'd: costs this process no resident memory
        # Execute: B4, a 4 x 250 MiB multipart message from an admitted key
        await conn.sock.send_multipart([bytes(16), huge, huge, huge, huge], copy=False)
        # Assert: libzmq dropped the connection at the first frame's size (the client sees
        # it lost), the server's memory never moved and it still serves a new session
        with pytest.raises(SLError):
            await conn.recv(20)
        peak = _status_kib(proc.pid, "VmHWM") * 1024
        print(f"4 x 250 MiB from an admitted key: RSS {before / MIB:.0f} -> peak {peak / MIB:.0f}")
        assert peak - before <= CEILING
        conn.close()
        again = await join(cfg.server.bind, model, base / "keys", ctx)
        again.close()
    finally:
        ctx.destroy(linger=0)


async def _steps(client: ClientWorker, count: int, training: asyncio.Task[Any]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while client.steps_done < count and not training.done() and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def test_an_admitted_keys_message_of_many_frames_is_cut_off_at_the_cap(
    deployment, procs
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a real server; an honest client training; an admitted attacker's connection
    files = deployment(clients=2, dataset="breast_cancer", ops=True, epochs=3)
    cfg = load_server(files["server"])
    # forked (tests/workerproc.py): a torch import less; its memory is under test, not its start
    proc = procs.fork("server", files["server"])
    await _ready(cfg.ops.listen, proc)
    base = files["server"].parent
    ctx = zmq.asyncio.Context()
    try:
        honest = ClientWorker(load_client(files["client-1"]), base, progress=False)
        training = asyncio.create_task(honest.run())
        await _steps(honest, 3, training)
        model = fingerprint(cfg.model, cfg.server.topology)
        attacker = await join(cfg.server.bind, model, base / "keys", ctx, name="client-2")
        before = _rss(proc.pid)
        _restart_peak(proc.pid)
        frame = bytes(MIB - 64)  # each within the frame cap: only the message caps stop it
        # Execute: one message of ATTACK_FRAMES such frames (600 in the figure)
        await attacker.sock.send_multipart([bytes(16), *[frame] * ATTACK_FRAMES], copy=False)
        with pytest.raises(SLError):  # the server closed the connection at the cap
            await attacker.recv(30)
        peak = _status_kib(proc.pid, "VmHWM") * 1024
        after = await _falls_back(proc.pid, before)
        summary = await asyncio.wait_for(training, 120)
        # Assert: the server read one message's cap of it (plus its read buffer), never the
        # message; the honest client trained on to the end beside it
        caps = caps_for(load_server(files["server"]).limits)
        bound = caps.message_bytes + SCRATCH_BYTES + 16 * MIB  # 16 MiB: the honest traffic
        print(
            f"{ATTACK_FRAMES} x 1 MiB frames in one message from an admitted key: server RSS "
            f"{before / MIB:.0f} MiB -> peak {peak / MIB:.0f} -> {after / MIB:.0f}"
        )
        assert caps.message_bytes < 2 * MIB  # cut off at about one chunk, whatever its frames
        assert peak - before <= bound
        assert summary["steps"] > 3 and summary["steps"] == honest.steps_done
        attacker.close()
    finally:
        ctx.destroy(linger=0)


def _half_sent_hellos(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` raw connections, each the PLAIN greeting and a 1 MiB HELLO command missing
    its last byte (red team's a3): libzmq held each buffer until the handshake timed out."""
    size = MIB
    frame = struct.pack(">BQ", LONG | COMMAND, size) + b"\x05HELLO" + bytes(size - 7)
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        socks.append(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(GREETING + frame)  # refused at the HELLO's header, while sending
    return socks


async def test_half_open_strangers_cost_at_most_their_handshake_budget(deployment, procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a real keyed server process and its resident size once ready
    cfg, proc, _ = await _server(deployment, procs)
    host, port = cfg.server.bind.removeprefix("tcp://").rsplit(":", 1)
    before = _rss(proc.pid)
    _restart_peak(proc.pid)
    count = 128
    loop = asyncio.get_running_loop()
    # Execute: 128 strangers each send a 1 MiB handshake command one byte short
    socks = await loop.run_in_executor(None, _half_sent_hellos, host, int(port), count)
    try:
        peak = _status_kib(proc.pid, "VmHWM") * 1024
    finally:
        for sock in socks:
            sock.close()
    # Assert: each was refused at its HELLO's header; what they cost together stays within
    # their handshake budgets (4 KiB each) and some slack; the server still serves
    print(f"{count} half-sent 1 MiB hellos: RSS {before / MIB:.0f} -> peak {peak / MIB:.0f} MiB")
    assert peak - before <= count * HANDSHAKE_BYTES + 8 * MIB
    await _ready(cfg.ops.listen, proc)
