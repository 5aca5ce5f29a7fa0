"""The asyncio ZMTP listener (sl_pipeline.zmtp_router) against real libzmq DEALERs: the gate,
NULL mode, ROUTER semantics, the inbound and outbound bounds, heartbeats and deadlines."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sl_pipeline import zmtp_router
from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.gate import USERNAME, Gate, connect_token
from sl_pipeline.keys import generate_keypair
from sl_pipeline.transport import new_socket
from sl_pipeline.zmtp_frames import command, encode, greeting, metadata
from sl_pipeline.zmtp_router import ZmtpRouter

SERVER, CLIENT = generate_keypair(), generate_keypair()
Reports = list[tuple[str, ...]]


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


async def _router(keyed: bool, reports: Reports, **options: Any) -> ZmtpRouter:
    gate = Gate(SERVER, [CLIENT.public]) if keyed else None
    return await ZmtpRouter.bind(
        "tcp://127.0.0.1:*",
        DEFAULT_LIMITS,
        gate=gate,
        on_gate=lambda verdict, address: reports.append(("gate", verdict, address)),
        on_drop=lambda reason, address, detail: reports.append(("drop", reason, detail)),
        **options,
    )


def _dealer(ctx: zmq.asyncio.Context, router: ZmtpRouter, token: bytes | None) -> Any:
    sock = new_socket(ctx, zmq.DEALER, DEFAULT_LIMITS)
    if token is not None:
        sock.plain_username, sock.plain_password = USERNAME, token
    sock.connect(router.endpoint)
    return sock


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_an_admitted_dealer_talks_through_the_gate_and_a_stranger_is_refused(
    ctx: zmq.asyncio.Context,
) -> None:
    reports: Reports = []
    router = await _router(True, reports)
    try:
        # An admitted key: a round trip, its address known, other ids silently dropped
        good = _dealer(ctx, router, connect_token(CLIENT, SERVER.public, time.time()))
        await good.send_multipart([b"hello", bytes(300_000)])
        identity, frames = await asyncio.wait_for(router.recv(), 10)
        assert [bytes(f)[:5] for f in frames] == [b"hello", bytes(5)] and len(frames[1]) == 300_000
        assert identity[:1] == b"\x00" and len(identity) == 5
        assert router.address_of(identity) == "127.0.0.1"
        assert await router.send(identity, [b"back", bytes(200_000)]) == 200_004
        assert [len(f) for f in await asyncio.wait_for(good.recv_multipart(), 10)] == [4, 200_000]
        assert await router.send(b"\x00gone", [b"x"]) == 0
        # A stranger with a forged token: libzmq reports a failed authentication
        stranger = _dealer(ctx, router, bytes(56))
        monitor = stranger.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        await stranger.send_multipart([b"never read", bytes(100_000)])
        event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400
        # Zero of the stranger's message frames were read: nothing waits, nothing routable
        assert ("gate", "not_admitted", "127.0.0.1") in reports
        assert not router.pending() and len(router.routable) == 1
        stranger.disable_monitor()
    finally:
        router.close()


async def test_an_insecure_null_dealer_works_and_a_keyed_one_is_refused(
    ctx: zmq.asyncio.Context,
) -> None:
    reports: Reports = []
    router = await _router(False, reports)
    try:
        plain = _dealer(ctx, router, None)
        await plain.send_multipart([b"a", b"b"])
        _, frames = await asyncio.wait_for(router.recv(), 10)
        assert [bytes(f) for f in frames] == [b"a", b"b"]
        keyed = _dealer(ctx, router, b"t" * 56)  # PLAIN against a NULL listener
        monitor = keyed.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))
        assert event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        keyed.disable_monitor()
    finally:
        router.close()


async def test_the_inbound_queue_pauses_reading_and_loses_nothing(
    ctx: zmq.asyncio.Context,
) -> None:
    router = await _router(False, [], rcvhwm=4)
    try:
        sock = _dealer(ctx, router, None)
        for index in range(50):
            await sock.send_multipart([b"%d" % index, bytes(50_000)])
        await _until(lambda: bool(router.routable))
        conn = next(iter(router.routable.values()))
        await _until(lambda: conn.paused)
        await asyncio.sleep(0.2)  # reading stays paused: the queue never grows past the bound
        assert len(conn.inbox) == 4
        got = [bytes((await asyncio.wait_for(router.recv(), 10))[1][0]) for _ in range(50)]
        assert got == [b"%d" % index for index in range(50)]
    finally:
        router.close()


async def test_one_read_of_many_small_messages_queues_no_more_than_the_bound(
    ctx: zmq.asyncio.Context,
) -> None:
    # Prepare: hundreds of tiny messages, many of them in each read of the socket
    router = await _router(False, [], rcvhwm=4)
    try:
        sock = _dealer(ctx, router, None)
        for index in range(300):
            await sock.send_multipart([b"%d" % index])
        await _until(lambda: bool(router.routable))
        conn = next(iter(router.routable.values()))
        await _until(lambda: conn.paused)
        # Execute / Assert: the queue holds the bound, the rest waits unparsed; every
        # message still comes, in order, and the queue never grows past the bound
        got = []
        for _ in range(300):
            assert len(conn.inbox) <= 4
            got.append(bytes((await asyncio.wait_for(router.recv(), 10))[1][0]))
        assert got == [b"%d" % index for index in range(300)]
    finally:
        router.close()


def _raw_null_peer(port: int) -> socket.socket:
    """A peer that completes the NULL handshake, then neither reads nor answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ready = command(b"READY", metadata({"Socket-Type": b"DEALER"}))
    sock.sendall(greeting(b"NULL", False) + ready + b"".join(map(bytes, encode([b"hi"]))))
    return sock


async def test_a_peer_that_stops_reading_is_cut_off_without_blocking_the_others(
    ctx: zmq.asyncio.Context,
) -> None:
    reports: Reports = []
    router = await _router(False, reports)
    router.max_outbound = 8 * 1024 * 1024
    raw = _raw_null_peer(int(router.endpoint.rsplit(":", 1)[1]))
    try:
        slow, _ = await asyncio.wait_for(router.recv(), 10)
        honest = _dealer(ctx, router, None)
        await honest.send_multipart([b"me"])
        fast, _ = await asyncio.wait_for(router.recv(), 10)
        for _ in range(40):  # 40 MiB to a peer that reads nothing: dropped at 8 MiB queued
            await router.send(slow, [bytes(1024 * 1024)])
            assert await router.send(fast, [b"still"]) == 5
        assert [r for r in reports if r[1] == "outbound"] and slow not in router.routable
        for _ in range(40):
            assert await asyncio.wait_for(honest.recv_multipart(), 10) == [b"still"]
    finally:
        raw.close()
        router.close()


async def test_heartbeats_keep_an_idle_peer_and_drop_a_silent_one(
    ctx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short clocks: PING every 0.1 s, silent for 0.6 s is gone, 0.6 s to finish a handshake
    monkeypatch.setattr(zmtp_router, "HEARTBEAT_IVL_S", 0.1)
    monkeypatch.setattr(zmtp_router, "HEARTBEAT_TIMEOUT_S", 0.6)
    monkeypatch.setattr(zmtp_router, "HANDSHAKE_IVL_S", 0.6)
    reports: Reports = []
    router = await _router(False, reports)
    port = int(router.endpoint.rsplit(":", 1)[1])
    idle = ctx.socket(zmq.DEALER)  # no heartbeats of its own: only our PINGs keep it
    idle.setsockopt(zmq.LINGER, 0)
    idle.connect(router.endpoint)
    mute = _raw_null_peer(port)  # past the handshake, then answers no PING
    half = socket.create_connection(("127.0.0.1", port), timeout=10)  # never greets
    try:
        await idle.send_multipart([b"once"])
        first, second = [await asyncio.wait_for(router.recv(), 10) for _ in range(2)]
        identity = first[0] if bytes(first[1][0]) == b"once" else second[0]
        await asyncio.sleep(2.0)  # over three timeouts, idle
        dropped = [r[1] for r in reports if r[0] == "drop"]
        assert sorted(dropped) == ["handshake_timeout", "silent"]
        assert list(router.routable) == [identity]
        assert await router.send(identity, [b"alive"]) == 5
        assert await asyncio.wait_for(idle.recv_multipart(), 5) == [b"alive"]
    finally:
        mute.close()
        half.close()
        router.close()


async def test_a_peer_whose_queue_is_full_is_not_taken_for_silent(
    ctx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: short clocks, and a peer whose messages fill its inbound queue: reading it
    # pauses, so its PONGs go unread until the worker takes a message
    monkeypatch.setattr(zmtp_router, "HEARTBEAT_IVL_S", 0.1)
    monkeypatch.setattr(zmtp_router, "HEARTBEAT_TIMEOUT_S", 0.6)
    reports: Reports = []
    router = await _router(False, reports, rcvhwm=4)
    try:
        sock = _dealer(ctx, router, None)
        for index in range(10):
            await sock.send_multipart([b"%d" % index])
        await _until(lambda: bool(router.routable))
        conn = next(iter(router.routable.values()))
        await _until(lambda: conn.paused)
        # Execute: a busy worker takes nothing for over two silence time-outs
        await asyncio.sleep(1.5)
        # Assert: the peer is kept (its silence was ours), and nothing it sent is lost
        assert not [r for r in reports if r[0] == "drop"]
        got = [bytes((await asyncio.wait_for(router.recv(), 10))[1][0]) for _ in range(10)]
        assert got == [b"%d" % index for index in range(10)]
    finally:
        router.close()
