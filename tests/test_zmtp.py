"""The sans-IO ZMTP server codec (sl_pipeline.zmtp): what it decodes, what it answers, and
that every cap refuses a peer before more than the cap is buffered (issue 15)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.zmtp import (
    Caps,
    Command,
    Credentials,
    Ready,
    Received,
    Violation,
    ZmtpServer,
    caps_for,
)
from sl_pipeline.zmtp_frames import (
    COMMAND,
    LONG,
    MORE,
    command,
    encode,
    greeting,
    metadata,
    parse_metadata,
    ping,
)

CAPS = Caps(frame_bytes=4096, message_frames=8, message_bytes=8192)
DEALER = metadata({"Socket-Type": b"DEALER", "Identity": b""})
NULL_CLIENT = greeting(b"NULL", as_server=False) + command(b"READY", DEALER)
frames_st = st.lists(st.binary(max_size=600), min_size=1, max_size=8)
messages_st = st.lists(frames_st, min_size=1, max_size=6)


def _joined(pieces: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(piece) for piece in pieces)


def _wire(messages: list[list[bytes]]) -> bytes:
    return NULL_CLIENT + b"".join(_joined(encode(frames)) for frames in messages)


def _received(events: list[object]) -> list[list[bytes]]:
    return [[bytes(f) for f in e.frames] for e in events if isinstance(e, Received)]


def _feed_split(codec: ZmtpServer, data: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    at = 0
    for cut in [*sorted(cuts), len(data)]:
        events += codec.feed(data[at:cut])
        at = max(at, cut)
    return events


@settings(max_examples=60, deadline=None)
@given(messages_st)
def test_frames_round_trip_through_encode_and_the_codec(messages: list[list[bytes]]) -> None:
    codec = ZmtpServer(CAPS, b"NULL")
    events = codec.feed(_wire(messages))
    assert isinstance(events[0], Ready) and events[0].metadata["socket-type"] == b"DEALER"
    assert _received(events) == messages
    assert codec.closed is None


@settings(max_examples=60, deadline=None)
@given(messages_st, st.lists(st.integers(min_value=0, max_value=6000), max_size=12))
def test_the_same_stream_split_anywhere_gives_the_same_events(
    messages: list[list[bytes]], cuts: list[int]
) -> None:
    data = _wire(messages)
    whole = ZmtpServer(CAPS, b"NULL").feed(data)
    split = _feed_split(ZmtpServer(CAPS, b"NULL"), data, [c % (len(data) + 1) for c in cuts])
    assert _received(split) == _received(whole) == messages


def test_large_frames_are_read_in_place_whole() -> None:
    caps = caps_for(DEFAULT_LIMITS)
    body = bytes(range(256)) * 4000  # > BIG_FRAME: read straight into its own buffer
    data = _wire([[b"env", body, b"tail"]])
    events = _feed_split(ZmtpServer(caps, b"NULL"), data, list(range(0, len(data), 70_001)))
    assert _received(events) == [[b"env", body, b"tail"]]


def _admitted_stream(frames: int, size: int) -> bytes:
    """A handshake, then ``frames`` frames of ``size`` bytes in one message."""
    body = bytes(size)
    return NULL_CLIENT + _joined(encode([body] * frames))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(min_value=9, max_value=40),
    st.integers(min_value=1, max_value=1500),
    st.integers(min_value=1, max_value=5000),
)
def test_too_many_frames_or_bytes_are_refused_before_more_than_the_cap_is_buffered(
    frames: int, size: int, step: int
) -> None:
    codec = ZmtpServer(CAPS, b"NULL")
    data = _admitted_stream(frames, size)
    taken, events = 0, []
    while codec.closed is None and taken < len(data):  # as a socket would: what fits
        target = codec.get_buffer()
        n = min(step, target.nbytes, len(data) - taken)
        target[:n] = data[taken : taken + n]
        taken += n
        events += codec.received(n)
    violation = events[-1]
    assert isinstance(violation, Violation) and violation.reason == "oversized"
    assert not _received(events)
    # Refused at the header of the first frame over a cap: never more than the caps read
    # (each frame has a header of at most 9 bytes, and the refused frame's header is read)
    cap_bytes = min(CAPS.message_frames * (size + 9), CAPS.message_bytes + size + 9) + 9
    assert taken - len(NULL_CLIENT) <= cap_bytes + step


def test_a_huge_frame_is_refused_from_its_header_alone() -> None:
    codec = ZmtpServer(caps_for(DEFAULT_LIMITS), b"NULL")
    events = codec.feed(NULL_CLIENT + struct.pack(">BQ", LONG, 2**40))
    assert (
        isinstance(events[-1], Violation) and "a frame of 1099511627776 bytes" in events[-1].detail
    )


def test_a_message_frame_before_the_handshake_is_refused() -> None:
    codec = ZmtpServer(CAPS, b"NULL")
    events = codec.feed(greeting(b"NULL", False) + _joined(encode([b"x"])))
    assert events == [Violation("malformed", "a message frame before the handshake finished")]


def test_a_strangers_handshake_is_capped_at_a_few_kib() -> None:
    # One huge handshake command: refused from its header
    codec = ZmtpServer(CAPS, b"PLAIN")
    huge = struct.pack(">BQ", LONG | COMMAND, 1024 * 1024) + bytes(4000)
    events = codec.feed(greeting(b"PLAIN", False) + huge)
    assert events == [Violation("oversized", "a handshake of over 4096 bytes")]
    assert len(codec.get_buffer()) <= 4096
    # An admitted peer's INITIATE with more metadata than the budget left: refused too
    codec = ZmtpServer(CAPS, b"PLAIN")
    assert codec.feed(_plain_client(b"u", bytes(255))) == [Credentials(b"u", bytes(255))]
    big = metadata({"Socket-Type": b"DEALER", "X": bytes(3800)})
    events = codec.accept() + codec.feed(command(b"INITIATE", big))
    assert events == [Violation("oversized", "a handshake of over 4096 bytes")]


def _plain_client(user: bytes, password: bytes) -> bytes:
    hello = bytes((len(user),)) + user + bytes((len(password),)) + password
    return greeting(b"PLAIN", False) + command(b"HELLO", hello)


def test_plain_accepted_peer_gets_welcome_then_ready_as_a_router() -> None:
    codec = ZmtpServer(CAPS, b"PLAIN")
    initiate = command(b"INITIATE", DEALER)
    events = codec.feed(_plain_client(b"user", b"token") + initiate + _joined(encode([b"m"])))
    assert events == [Credentials(b"user", b"token")]
    events = codec.accept()  # the rest was held back until the verdict
    assert isinstance(events[0], Ready) and _received(events) == [[b"m"]]
    out = _joined(codec.data_to_send())
    assert out.startswith(greeting(b"PLAIN"))
    assert command(b"WELCOME") in out
    assert out.endswith(command(b"READY", metadata({"Socket-Type": b"ROUTER"})))


def test_plain_refused_peer_gets_error_and_nothing_more_is_read() -> None:
    codec = ZmtpServer(CAPS, b"PLAIN")
    events = codec.feed(_plain_client(b"user", b"bad") + command(b"INITIATE", DEALER))
    assert events == [Credentials(b"user", b"bad")]
    codec.refuse(b"400")
    out = _joined(codec.data_to_send())
    assert out.endswith(b"\x04\x09\x5eRROR\x03400")  # libzmq 4.3's ERROR (see zmtp._ERROR)
    assert codec.closed is not None and codec.closed.reason == "not_admitted"
    assert codec.feed(_joined(encode([b"m"]))) == []


def test_a_mechanism_mismatch_is_refused_at_the_greeting() -> None:
    events = ZmtpServer(CAPS, b"PLAIN").feed(NULL_CLIENT)
    assert events[0].reason == "malformed" and "mechanism b'NULL'" in events[0].detail  # type: ignore[union-attr]


def test_a_ping_is_answered_with_its_context_and_its_ttl_kept() -> None:
    codec = ZmtpServer(CAPS, b"NULL")
    codec.feed(NULL_CLIENT)
    codec.data_to_send()
    events = codec.feed(ping(100, b"ctx") + _joined(encode([b"a", b"b"])))
    assert events[0] == Command(b"PING", b"\x00\x64ctx")
    assert _received(events) == [[b"a", b"b"]]
    assert codec.peer_ttl_s == 10.0
    assert _joined(codec.data_to_send()) == command(b"PONG", b"ctx")


def test_metadata_round_trips_and_bad_metadata_is_refused() -> None:
    assert parse_metadata(metadata({"Socket-Type": b"DEALER", "X": bytes(300)})) == {
        "socket-type": b"DEALER",
        "x": bytes(300),
    }
    assert parse_metadata(b"\x0bSocket-Type\x00\x00\x00\x09DEAL") is None
    codec = ZmtpServer(CAPS, b"NULL")
    events = codec.feed(
        greeting(b"NULL", False) + command(b"READY", metadata({"Socket-Type": b"PUB"}))
    )
    assert isinstance(events[-1], Violation)


def test_the_caps_follow_the_protocols_true_maxima() -> None:
    caps = caps_for(DEFAULT_LIMITS)
    assert caps.message_frames == DEFAULT_LIMITS.max_frames + 1  # envelope + max_frames
    # one chunk (1 MiB) plus a tag per frame: a whole message is never much over a chunk
    assert 1024 * 1024 < caps.message_bytes <= 1024 * 1024 + 8192 + 16 * caps.message_frames
    assert MORE == 1
