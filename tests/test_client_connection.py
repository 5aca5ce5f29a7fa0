"""The client's connection waits for a reply through its own reader on the socket's
descriptor (``workers.client.connection``): a reply still arrives, a silent peer still
times out, and a dropped link still ends the wait at once, not after the time-out."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import zmq
import zmq.asyncio

from sl_pipeline.errors import ReplyTimeoutError, TransportError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.session import Session
from sl_pipeline.transport import Channel
from workers.client.connection import ClientConnection

TIMEOUT_S = 10.0


def _sessions() -> tuple[Session, Session]:
    k1, k2 = os.urandom(32), os.urandom(32)
    client = Session(send_key=k1, recv_key=k2, remote_static=b"s", handshake_hash=b"h")
    server = Session(send_key=k2, recv_key=k1, remote_static=b"c", handshake_hash=b"h")
    return client, server


async def test_a_reply_arrives_a_silent_peer_times_out_and_a_drop_ends_the_wait() -> None:
    # Prepare: a ROUTER standing in for the server, and a client connection with a session
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn = ClientConnection(ctx, f"tcp://127.0.0.1:{port}")
    mine, theirs = _sessions()
    conn.channel, peer = Channel(mine), Channel(theirs)
    conn.sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        request = Message(kind=Kind.FORWARD, client="client-1", step=7)
        await conn.send(request)
        identity, *frames = await asyncio.wait_for(router.recv_multipart(), TIMEOUT_S)
        assert peer.unpack(frames).step == 7
        # Execute / Assert: the reply, sent while the client waits, ends the wait
        waiting = asyncio.ensure_future(conn.recv(60.0))
        await asyncio.sleep(0.05)  # the client is waiting on its reader now
        await router.send_multipart([identity, *peer.pack(request.reply(Kind.BACKWARD))])
        reply = await asyncio.wait_for(waiting, TIMEOUT_S)  # woken, not timed out (60 s)
        assert (reply.kind, reply.answers, reply.step) == (Kind.BACKWARD, Kind.FORWARD, 7)
        # Execute / Assert: nobody answers: the wait ends after its time-out
        started = time.monotonic()
        with pytest.raises(ReplyTimeoutError, match=r"within 0\.2s while waiting for a reply"):
            await conn.recv(0.2)
        assert 0.15 < time.monotonic() - started < TIMEOUT_S
        # Execute / Assert: the peer goes away: the wait ends long before its time-out
        waiting = asyncio.ensure_future(conn.recv(60.0))
        await asyncio.sleep(0.05)
        router.close(linger=0)
        started = time.monotonic()
        with pytest.raises(TransportError, match="lost"):
            await asyncio.wait_for(waiting, TIMEOUT_S)
        assert time.monotonic() - started < TIMEOUT_S
    finally:
        conn.close()
        router.close(linger=0)
        ctx.term()


async def test_a_send_from_another_task_does_not_hide_a_reply_queued_for_a_waiter() -> None:
    # Prepare: inproc, so a reply is in the client's queue, and its descriptor signalled,
    # as soon as the router's send returns; one task waits for a reply on the reader
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://client-connection-send-race")
    conn = ClientConnection(ctx, "inproc://client-connection-send-race")
    mine, theirs = _sessions()
    conn.channel, peer = Channel(mine), Channel(theirs)
    conn.sock.connect("inproc://client-connection-send-race")
    try:
        first = Message(kind=Kind.FORWARD, client="client-1", step=1)
        await conn.send(first)
        identity, *_ = await asyncio.wait_for(router.recv_multipart(), TIMEOUT_S)
        waiting = asyncio.ensure_future(conn.recv(60.0))
        await asyncio.sleep(0)  # one turn: the wait checked the queue (empty) and sleeps
        assert not waiting.done()
        await router.send_multipart([identity, *peer.pack(first.reply(Kind.BACKWARD))])
        # Execute: another task sends before the loop polls the descriptor. A send handles
        # the socket's pending commands, the reply's signal among them (libzmq skips that
        # within about a millisecond of the last time: the wait on the CPU stands for a
        # step's compute), so the descriptor is quiet while the reply sits in the queue.
        time.sleep(0.01)
        await conn.send(Message(kind=Kind.FORWARD, client="client-1", step=2))
        # Assert: the waiter gets the reply now, not after its 60 s time-out
        reply = await asyncio.wait_for(waiting, 2.0)
        assert (reply.kind, reply.step) == (Kind.BACKWARD, 1)
    finally:
        conn.close()
        router.close(linger=0)
        ctx.term()
