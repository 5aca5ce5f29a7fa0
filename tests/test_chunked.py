"""Chunked messages (envelope v2): large messages sealed and opened as a head plus chunk
parts. Every chunk altered, moved, repeated or missing is refused; driven with bytes only."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Sequence

import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sl_pipeline.chunked import MIN_CHUNK_BYTES, pieces
from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.errors import BadTagError, CryptoError, LimitError, ReplayError
from sl_pipeline.handshake import ClientHandshake, ServerHandshake, is_handshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import Kind, Message
from sl_pipeline.session import ENVELOPE_SIZE, PlainSession, Session
from sl_pipeline.transport import Channel, DealerConnection, frame_buffers
from sl_pipeline.zmtp_router import ZmtpRouter

CHUNK = MIN_CHUNK_BYTES
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Part = Sequence[bytes | bytearray | memoryview]

# A few buffers of which at least one is larger than a chunk, so the message is chunked.
sizes_st = st.lists(st.integers(0, 3 * CHUNK), min_size=1, max_size=4).filter(
    lambda sizes: sum(sizes) > CHUNK
)


def _pair(chunk_bytes: int = CHUNK) -> tuple[Session, Session]:
    k1, k2 = os.urandom(32), os.urandom(32)
    sender = Session(
        send_key=k1, recv_key=k2, remote_static=b"a", handshake_hash=b"h", chunk_bytes=chunk_bytes
    )
    receiver = Session(
        send_key=k2, recv_key=k1, remote_static=b"b", handshake_hash=b"h", chunk_bytes=chunk_bytes
    )
    return sender, receiver


def _buffers(sizes: list[int]) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


def _parts(sender: Session, buffers: list[bytes]) -> list[list[bytes]]:
    """Sealed parts, copied to bytes (as they would arrive from the network)."""
    return [[bytes(frame) for frame in part] for part in sender.seal_parts(buffers)]


def _feed_all(receiver: Session, parts: list[list[bytes]]) -> Sequence[object] | None:
    result = None
    for part in parts:
        result = receiver.feed(part)
    return result


@FUZZ
@given(sizes_st)
def test_chunked_message_round_trips_and_is_one_head_plus_its_pieces(sizes: list[int]) -> None:
    # Prepare
    sender, receiver = _pair()
    buffers = _buffers(sizes)

    # Execute
    parts = _parts(sender, buffers)
    results = [receiver.feed(part) for part in parts]

    # Assert: nothing until the final chunk; then exactly the buffers, and the session goes on
    assert len(parts) == 1 + len(pieces(sizes, CHUNK))
    assert all(len(part) == 2 and len(part[0]) == ENVELOPE_SIZE for part in parts)
    assert results[:-1] == [None] * (len(parts) - 1)
    opened = results[-1]
    assert opened is not None and [bytes(b) for b in opened] == buffers
    assert receiver.open(sender.seal([b"next"])) == [bytearray(b"next")]


def test_a_message_within_one_chunk_stays_one_part() -> None:
    sender, receiver = _pair()
    parts = _parts(sender, [b"header", bytes(CHUNK - 6)])
    assert len(parts) == 1 and len(parts[0]) == 3
    assert receiver.feed(parts[0]) is not None


@FUZZ
@given(sizes_st, st.data())
def test_tampering_any_byte_of_any_part_is_refused(sizes: list[int], data: st.DataObject) -> None:
    # Prepare
    sender, receiver = _pair()
    parts = _parts(sender, _buffers(sizes))
    which = data.draw(st.integers(0, len(parts) - 1), label="part")
    frame = data.draw(st.integers(0, 1), label="frame")
    pos = data.draw(st.integers(0, len(parts[which][frame]) - 1), label="byte")
    altered = bytearray(parts[which][frame])
    altered[pos] ^= data.draw(st.integers(1, 255), label="mask")
    parts[which][frame] = bytes(altered)

    # Execute / Assert: refused at the altered part at the latest, never delivered
    with pytest.raises(CryptoError):
        _feed_all(receiver, parts)


@FUZZ
@given(sizes_st, st.data())
def test_reordered_chunks_are_refused(sizes: list[int], data: st.DataObject) -> None:
    sender, receiver = _pair()
    parts = _parts(sender, _buffers(sizes))
    i = data.draw(st.integers(0, len(parts) - 2), label="swap")
    parts[i], parts[i + 1] = parts[i + 1], parts[i]
    with pytest.raises(ReplayError, match=r"chunk|head|truncated"):
        _feed_all(receiver, parts)


@FUZZ
@given(sizes_st, st.data())
def test_a_repeated_chunk_is_refused(sizes: list[int], data: st.DataObject) -> None:
    sender, receiver = _pair()
    parts = _parts(sender, _buffers(sizes))
    i = data.draw(st.integers(1, len(parts) - 1), label="repeat")
    with pytest.raises(ReplayError, match=r"repeated|replayed"):
        _feed_all(receiver, [*parts[: i + 1], parts[i], *parts[i + 1 :]])


@FUZZ
@given(sizes_st, st.data())
def test_a_missing_chunk_is_refused(sizes: list[int], data: st.DataObject) -> None:
    # Prepare: drop one part, then the next message arrives
    sender, receiver = _pair()
    parts = _parts(sender, _buffers(sizes))
    i = data.draw(st.integers(1, len(parts) - 1), label="drop")
    following = _parts(sender, [b"next"])

    # Execute / Assert
    with pytest.raises(ReplayError, match=r"lost|truncated"):
        _feed_all(receiver, [*parts[:i], *parts[i + 1 :], *following])


def test_truncation_names_the_message_and_how_many_chunks_arrived() -> None:
    sender, receiver = _pair()
    parts = _parts(sender, [bytes(3 * CHUNK)])
    assert _feed_all(receiver, parts[:2]) is None
    with pytest.raises(ReplayError, match=r"message 0 ended after 1 of its 3 chunks \(truncated\)"):
        receiver.feed(_parts(sender, [b"next"])[0])


def test_a_chunk_of_another_message_is_refused() -> None:
    # A chunk from message 1 spliced into message 0, at the right index
    sender, receiver = _pair()
    first = _parts(sender, [bytes(2 * CHUNK)])
    second = _parts(sender, [bytes(2 * CHUNK)])
    with pytest.raises(ReplayError, match="message 1 arrived"):
        _feed_all(receiver, [first[0], second[1]])


def test_a_chunk_moved_into_the_index_of_another_fails_its_tag() -> None:
    # The attacker rewrites the plaintext envelope of chunk 2 to say chunk 1
    sender, receiver = _pair()
    parts = _parts(sender, [bytes(3 * CHUNK)])
    envelope = bytearray(parts[2][0])
    envelope[-4:] = (1).to_bytes(4, "big")
    with pytest.raises(BadTagError):
        _feed_all(receiver, [parts[0], [bytes(envelope), parts[2][1]]])


def test_a_head_announcing_more_than_the_limit_is_refused_before_allocating() -> None:
    sender, receiver = _pair()
    parts = _parts(sender, [bytes(4 * CHUNK)])
    with pytest.raises(LimitError, match="the limit is 8192"):
        receiver.feed(parts[0], max_bytes=2 * CHUNK)


def test_a_plaintext_session_chunks_large_messages_too() -> None:
    # Prepare: --insecure sessions, so that no frame exceeds a chunk (MAXMSGSIZE) there either
    sender, receiver = PlainSession(chunk_bytes=CHUNK), PlainSession(chunk_bytes=CHUNK)
    buffers = _buffers([3 * CHUNK + 5, 7])
    # Execute
    parts = [[bytes(frame) for frame in part] for part in sender.seal_parts(buffers)]
    # Assert: every frame within a chunk, the message whole, a part without its head refused
    assert len(parts) > 2 and max(len(f) for part in parts for f in part) <= CHUNK
    assert [bytes(b) for b in _feed_all(receiver, parts) or []] == buffers
    with pytest.raises(ReplayError, match="without its head"):
        PlainSession(chunk_bytes=CHUNK).feed(parts[1])


def test_a_chunk_size_outside_the_limits_is_refused() -> None:
    with pytest.raises(LimitError, match="chunk size"):
        _pair(chunk_bytes=1024)


def test_channel_sends_a_large_tensor_in_chunks_and_decodes_it_whole() -> None:
    # Prepare
    sender, receiver = (Channel(s) for s in _pair(chunk_bytes=64 * 1024))
    act = torch.randn(32, 64, 16, 16)  # 2 MiB

    # Execute
    parts = list(sender.parts(Message(kind=Kind.FORWARD, step=3, tensors={"act": act})))
    messages = [receiver.feed(part) for part in parts]

    # Assert
    assert len(parts) == 1 + 1 + 32  # head, the JSON header, 32 chunks of the tensor
    received = messages[-1]
    assert messages[:-1] == [None] * (len(parts) - 1) and received is not None
    assert received.step == 3 and torch.equal(received.tensors["act"], act)
    received.tensors["act"].add_(1)  # writable: the model may use it in place


@pytest.mark.timeout(60)
async def test_a_large_message_crosses_real_sockets_in_chunks_both_ways() -> None:
    # Prepare: the workers' listener echoing every message, behind the real Noise IK handshake
    ctx = zmq.asyncio.Context()
    router = await ZmtpRouter.bind("tcp://127.0.0.1:*", DEFAULT_LIMITS)
    url = router.endpoint
    server_key = generate_keypair()
    handshake = ServerHandshake(server_key, lambda key: True, insecure=False)
    parts_seen: list[int] = []

    async def serve() -> None:
        channels: dict[bytes, Channel] = {}
        while True:
            identity, frames = await router.recv()
            buffers = frame_buffers(frames)
            if is_handshake(buffers):
                reply, session, _, _ = handshake.answer(buffers, lambda hello, key: {})
                channels[identity] = Channel(session)
                await router.send(identity, reply)
                continue
            parts_seen.append(len(buffers))
            message = channels[identity].feed(buffers)
            if message is not None:
                answer = message.reply(Kind.BACKWARD, tensors={"grad": message.tensor("act") * 2})
                await router.send_parts(identity, channels[identity].parts(answer))

    server = asyncio.ensure_future(serve())
    conn = DealerConnection(ctx, url)
    act = torch.randn(3 * 1024 * 1024 // 4)  # 3 MiB: a head and 3 chunks each way
    try:
        hello = ClientHandshake({"client": "c"}, generate_keypair(), server_key.public)
        hello.connect_token = lambda now_s: None  # type: ignore[method-assign]  # no gate here
        await asyncio.wait_for(conn.handshake(hello, 10), 15)

        # Execute
        sent = await conn.send(Message(kind=Kind.FORWARD, step=1, tensors={"act": act}))
        reply = await asyncio.wait_for(conn.recv(10), 15)
    finally:
        server.cancel()
        conn.close()
        router.close()
        ctx.term()

    # Assert
    assert len(parts_seen) == 1 + 1 + 3  # head, JSON header, three 1 MiB pieces of the tensor
    assert sent > act.numel() * 4 and reply.step == 1
    assert torch.equal(reply.tensors["grad"], act * 2)


async def test_a_closed_dealer_connection_lets_go_of_an_unfinished_chunked_reply() -> None:
    """A link closed with a chunked reply half in holds none of its buffers (up to
    limits.max_message_bytes) while the connection lives on: an exception raised out of its
    recv keeps it for as long as that exception is kept (the relay's upstream too)."""
    # Prepare: the head and first part of a 3 MiB reply fed in, the rest never comes
    ctx = zmq.asyncio.Context()
    conn = DealerConnection(ctx, "tcp://127.0.0.1:9")
    conn.channel = Channel(PlainSession())
    big = Message(kind=Kind.RESULT, step=1, tensors={"out": torch.zeros(3 * 2**20 // 4)})
    head, first, *_ = Channel(PlainSession()).parts(big)
    assert conn.channel.feed(head) is None and conn.channel.feed(first) is None
    pending = weakref.ref(conn.channel)
    # Execute
    conn.close()
    ctx.term()
    gc.collect()
    # Assert: the connection lives, its half-assembled reply does not
    assert conn.endpoint and pending() is None
