"""What an admitted peer can make the ZMTP listener hold (issue 15, the red team's B1-B11):
inbound queues bounded in bytes and in messages, one budget shared by every connection
(closed ones included), a bounded parse per callback, one PONG however many PINGs, a peer
that does not read paused and cut off, and at most ``MAX_CONNECTIONS_PER_KEY`` connections
per admitted key. In-process, against raw sockets and real libzmq DEALERs."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.errors import PeerError
from sl_pipeline.gate import MAX_CONNECTIONS_PER_KEY, ZAP_TOO_MANY, connect_token
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.transport import DealerConnection
from sl_pipeline.zmtp import FRAME_OVERHEAD, STEPS_PER_CALL, Received, ZmtpServer, caps_for
from sl_pipeline.zmtp_frames import command, greeting, metadata, ping

from .test_zmtp_router import CLIENT, SERVER, Reports, _dealer, _raw_null_peer, _router, _until
from .test_zmtp_router import ctx as ctx  # the fixture

MORE_LONG = 0x03  # frame flags: more frames follow, an 8-byte size
EMPTY_MORE = b"\x01\x00"  # an empty frame, more to come
EMPTY = b"\x00\x00"  # one message of one empty frame: 2 bytes on the wire, a queue entry here
NULL_CLIENT = greeting(b"NULL", False) + command(b"READY", metadata({"Socket-Type": b"DEALER"}))


def _port(router: object) -> int:
    return int(router.endpoint.rsplit(":", 1)[1])  # type: ignore[attr-defined]


def test_one_read_is_parsed_a_bounded_number_of_items_at_a_time() -> None:
    # Prepare: a read holding 20,000 tiny messages, and room for all of them
    codec = ZmtpServer(caps_for(DEFAULT_LIMITS), b"NULL")
    codec.feed(NULL_CLIENT)
    target = codec.get_buffer()
    target[: 2 * 20_000] = EMPTY * 20_000
    # Execute: the callback that got the read parses a slice; allow() goes on with the rest
    first = codec.received(2 * 20_000)
    assert len(first) == STEPS_PER_CALL and codec.blocked
    total = len(first)
    for _ in range(100):
        if not codec.blocked:
            break
        total += len(codec.allow(2**62))
    # Assert: all of it, none lost, and each message's cost counts its frame overhead
    assert total == 20_000 and not codec.blocked
    assert first[0] == Received([b""], FRAME_OVERHEAD)


def test_a_ping_flood_leaves_one_pong_to_the_latest() -> None:
    codec = ZmtpServer(caps_for(DEFAULT_LIMITS), b"NULL")
    codec.feed(NULL_CLIENT)
    codec.data_to_send()
    codec.feed(b"".join(ping(100, b"c%03d" % index) for index in range(300)))
    assert codec.data_to_send() == [command(b"PONG", b"c299")]


async def test_a_queue_is_bounded_in_bytes_as_well_as_in_messages() -> None:
    # Prepare: a queue of 10,000 messages but 20,000 bytes: 200 empty messages at most
    router = await _router(False, [], rcvhwm=10_000)
    router.inbox_bytes = 20_000
    sock = socket.create_connection(("127.0.0.1", _port(router)), timeout=10)
    try:
        sock.sendall(NULL_CLIENT + EMPTY * 5_000)
        await _until(lambda: bool(router.routable))
        conn = next(iter(router.routable.values()))
        await _until(lambda: conn.paused)
        # Execute / Assert: the queue stays within its bytes (plus one message), and every
        # message still comes once the worker takes them
        for _ in range(5_000):
            assert conn.inbox_bytes <= 20_000 + FRAME_OVERHEAD
            await asyncio.wait_for(router.recv(), 10)
        assert router.inbound == 0 and not router.pending()
    finally:
        sock.close()
        router.close()


async def test_all_queues_share_one_budget_closed_connections_included() -> None:
    # Prepare: a 60,000-byte budget for all queues; eight peers each send 4,000 tiny
    # messages (400,000 bytes queued, were each read whole) and close at once
    reports: Reports = []
    router = await _router(False, reports, rcvhwm=100_000)
    router.inbound_bytes = 60_000
    peers = [socket.create_connection(("127.0.0.1", _port(router)), timeout=10) for _ in range(8)]
    try:
        for sock in peers:
            sock.sendall(NULL_CLIENT + EMPTY * 4_000)
            sock.close()
        # Execute: the worker reads slowly while they are closed
        deadline, taken = time.monotonic() + 10, 0
        await _until(lambda: router.pending())
        while time.monotonic() < deadline and (router.pending() or router.departed):
            # Assert: what is held never passes the budget, plus one message a connection
            held = router.inbound + router.departed_raw
            assert held <= 60_000 + 8 * FRAME_OVERHEAD, held
            if router.pending():
                await asyncio.wait_for(router.recv(), 10)
                taken += 1
            else:
                await asyncio.sleep(0.01)
        assert taken and not router.departed and router.inbound == 0
    finally:
        router.close()


async def test_a_peer_that_reads_nothing_is_paused_then_dropped_for_its_pongs() -> None:
    # Prepare: a peer whose socket takes nothing, and MiBs sent to it until the kernel's
    # buffers are full
    reports: Reports = []
    router = await _router(False, reports)
    router.max_outbound = 64 * 1024 * 1024
    raw = _raw_null_peer(_port(router))
    try:
        slow, _ = await asyncio.wait_for(router.recv(), 10)
        conn = router.routable[slow]
        for _ in range(32):
            await router.send(slow, [bytes(1024 * 1024)])
            if conn.write_paused:
                break
        # Assert: over the write buffer's high mark, its reading pauses as well
        await _until(lambda: conn.write_paused and conn.paused)
        # Execute: with the bound lowered, a PING's PONG is one write too many
        router.max_outbound = 1024
        conn.write_paused = False
        conn.steer()
        raw.sendall(ping(100, b"x"))
        await _until(lambda: any(r[1] == "outbound" for r in reports))
        assert slow not in router.routable
    finally:
        raw.close()
        router.close()


async def test_one_key_holds_a_few_connections_at_most(ctx: zmq.asyncio.Context) -> None:
    reports: Reports = []
    router = await _router(True, reports)
    try:
        # Prepare: the most one key may hold, all through
        socks = [
            _dealer(ctx, router, connect_token(CLIENT, SERVER.public, time.time()))
            for _ in range(MAX_CONNECTIONS_PER_KEY)
        ]
        for sock in socks:
            await sock.send_multipart([b"hi"])
            await asyncio.wait_for(router.recv(), 10)
        # Execute: one more; libzmq reports ZAP_TOO_MANY (the client's "overloaded" refusal)
        extra = _dealer(ctx, router, connect_token(CLIENT, SERVER.public, time.time()))
        monitor = extra.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))
        assert event["value"] == ZAP_TOO_MANY
        assert ("gate", "connections", "127.0.0.1") in reports
        assert len(router.routable) == MAX_CONNECTIONS_PER_KEY
        extra.disable_monitor()
        extra.close(linger=0)
        # Assert: once one closes, a reconnect gets in
        socks.pop().close(linger=0)
        await _until(lambda: len(router.routable) < MAX_CONNECTIONS_PER_KEY)
        again = _dealer(ctx, router, connect_token(CLIENT, SERVER.public, time.time()))
        await again.send_multipart([b"back"])
        assert [bytes(f) for f in (await asyncio.wait_for(router.recv(), 10))[1]] == [b"back"]
    finally:
        router.close()


def test_a_closed_peers_backlog_keeps_its_bytes_not_the_read_buffer() -> None:
    # Prepare: 1,000 messages read, room for 10
    codec = ZmtpServer(caps_for(DEFAULT_LIMITS), b"NULL")
    codec.feed(NULL_CLIENT)
    codec.room = 10
    assert len(codec.feed(EMPTY * 1_000)) == 10
    # Execute: the peer closes; what is left is kept as its bytes only
    codec.finish()
    assert codec.unparsed == 2 * 990 and codec.get_buffer().nbytes == 0
    # Assert: it is still all read, in turns
    got = 0
    for _ in range(200):
        got += len(codec.allow(64))
        if not codec.blocked:
            break
    assert got == 990


def test_a_closed_peers_unfinished_message_is_dropped_not_held() -> None:
    # Prepare: 63 empty messages read with room for none, then a large frame of a message
    # begun and never finished (red team round 2, d1: 1.2 MiB held per closed connection)
    codec = ZmtpServer(caps_for(DEFAULT_LIMITS), b"NULL")
    codec.feed(NULL_CLIENT)
    codec.room = 0
    big = bytes([MORE_LONG]) + (900_000).to_bytes(8, "big") + b"\x01" * 1000
    assert codec.feed(EMPTY * 63 + big) == []
    # Execute: the peer closes; the held-back bytes are then read
    codec.finish()
    assert codec.unparsed < 64 * (2 + FRAME_OVERHEAD) + len(big)  # what the budget counts
    got = 0
    for _ in range(200):
        got += len(codec.allow(64))
        if not codec.blocked:
            break
    # Assert: every whole message, and no buffer for a frame whose rest never comes
    assert got == 63 and codec.unparsed == 0 and codec.get_buffer().nbytes < 2048


def test_a_large_frame_cut_by_the_close_is_dropped_with_its_message() -> None:
    codec = ZmtpServer(caps_for(DEFAULT_LIMITS), b"NULL")
    codec.feed(NULL_CLIENT)
    head = bytes([MORE_LONG]) + (900_000).to_bytes(8, "big")
    assert codec.feed(EMPTY_MORE + head + b"\x01" * 300_000) == []
    assert codec.unparsed >= 900_000  # counted at its full size while it may complete
    codec.finish()
    assert codec.unparsed == 0


async def test_a_client_over_its_keys_connections_is_told_why(ctx: zmq.asyncio.Context) -> None:
    # Prepare: the key's connections all open
    router = await _router(True, [])
    try:
        socks = []  # held: a socket collected is a connection closed
        for _ in range(MAX_CONNECTIONS_PER_KEY):
            socks.append(_dealer(ctx, router, connect_token(CLIENT, SERVER.public, time.time())))
            await socks[-1].send_multipart([b"hi"])
            await asyncio.wait_for(router.recv(), 10)
        # Execute: a client joins with the same key
        conn = DealerConnection(ctx, router.endpoint)
        handshake = ClientHandshake({"name": "client-1"}, CLIENT, SERVER.public)
        # Assert: a retryable refusal that says what to do
        with pytest.raises(PeerError, match="holds 4 connections there already") as refused:
            await conn.handshake(handshake, 10)
        assert refused.value.remote_code == "overloaded" and refused.value.retryable
        conn.close()
    finally:
        router.close()
