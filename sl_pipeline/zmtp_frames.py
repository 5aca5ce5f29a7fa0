"""ZMTP 3.x wire pieces (RFC 23/37): greeting, frame headers, commands, metadata, and the
caps a listener holds each frame to. Pure.

The codec that reads them is :mod:`sl_pipeline.zmtp`; these build what it writes (and what
tests send as a hostile peer would).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .chunked import DEFAULT_CHUNK_BYTES
from .envelope import ENVELOPE_SIZE
from .limits import Limits

Buffer = bytes | bytearray | memoryview
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
GREETING_BYTES = 64
_LONG = struct.Struct(">BQ")
_TTL = struct.Struct(">H")
_PROPERTY_SIZE = struct.Struct(">I")
TAG_BYTES = 16  # an AES-GCM tag: what sealing adds to each frame
HANDSHAKE_FRAME_MAX = 65_535  # the Noise message limit
FRAME_SLACK = 4096
HELLO_FRAMES = 4  # sl_pipeline.handshake's hello: [b"sl-hello", version, mode, payload]
# Greeting and every command before READY: a PLAIN HELLO holds two strings of <= 255
# bytes, libzmq's INITIATE/READY metadata about 40: a stranger costs at most this much.
HANDSHAKE_BYTES = 4096


def max_frame_bytes(limits: Limits) -> int:
    """The largest frame a worker reads (libzmq's ``MAXMSGSIZE`` on the client side).
    Every message over the chunk size travels chunked, in both modes
    (:mod:`sl_pipeline.envelope`), so no legitimate frame is bigger than one chunk (or a
    Noise handshake message) plus its tag; the slack covers ZMTP's own commands."""
    largest = max(DEFAULT_CHUNK_BYTES, HANDSHAKE_FRAME_MAX)
    return largest + TAG_BYTES + FRAME_SLACK


@dataclass(frozen=True)
class Caps:
    """What one connection may make us buffer, checked at each frame header."""

    frame_bytes: int
    message_frames: int
    message_bytes: int
    handshake_bytes: int = HANDSHAKE_BYTES


def caps_for(limits: Limits) -> Caps:
    """The true maxima of what sl-pipeline sends (``Session.seal`` / ``seal_parts``):

    * a one-part message is ``[envelope, c_1 .. c_n]``, ``n <= limits.max_frames`` (the
      session refuses more), and is one part only while its plaintexts hold at most one
      chunk: ``16 + chunk + 16 n`` bytes;
    * a chunk part is ``[envelope, one sealed piece]``: ``16 + chunk + 16``; a chunked head
      ``[envelope, sealed layout]`` has ``8 + 8 n + 32``;
    * a hello is 4 frames, its Noise message at most 65,535 bytes.

    So ``max_frames + 1`` frames (at least the hello's 4) and one largest frame plus a tag
    and an envelope per frame bound every legitimate message; nothing more is buffered."""
    frames = max(limits.max_frames + 1, HELLO_FRAMES)
    frame = max_frame_bytes(limits)
    return Caps(frame, frames, frame + frames * TAG_BYTES + ENVELOPE_SIZE)


def greeting(mechanism: bytes, as_server: bool = True) -> bytes:
    """A whole ZMTP 3.1 greeting: signature, version, mechanism, as-server, filler. A server
    sends it at once (libzmq sends its signature first and the rest after seeing ours)."""
    server = b"\x01" if as_server and mechanism == b"PLAIN" else b"\x00"
    return b"\xff" + bytes(8) + b"\x7f\x03\x01" + mechanism.ljust(20, b"\x00") + server + bytes(31)


def frame_head(size: int, flags: int = 0) -> bytes:
    if size <= 255:
        return bytes((flags, size))
    return _LONG.pack(flags | LONG, size)


def encode(frames: Sequence[Buffer]) -> list[Buffer]:
    """One multipart message as header, body, header, body ... (bodies not copied)."""
    out: list[Buffer] = []
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        out.append(frame_head(memoryview(frame).nbytes, MORE if index < last else 0))
        out.append(frame)
    return out


def command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes((len(name),)) + name + data
    return frame_head(len(body), COMMAND) + body


def metadata(properties: dict[str, bytes]) -> bytes:
    return b"".join(
        bytes((len(name),)) + name.encode() + _PROPERTY_SIZE.pack(len(value)) + value
        for name, value in properties.items()
    )


def parse_metadata(blob: bytes) -> dict[str, bytes] | None:
    """Properties of a READY or INITIATE; None if malformed."""
    out: dict[str, bytes] = {}
    at = 0
    while at < len(blob):
        size = blob[at]
        name, at = blob[at + 1 : at + 1 + size], at + 1 + size
        if size == 0 or at + 4 > len(blob):
            return None
        (length,) = _PROPERTY_SIZE.unpack_from(blob, at)
        value, at = blob[at + 4 : at + 4 + length], at + 4 + length
        if at > len(blob):
            return None
        out[name.decode("latin-1").lower()] = value
    return out


def ping(ttl_ds: int, context: bytes = b"") -> bytes:
    """A PING command; ``ttl_ds``: how long the peer may wait for traffic, in 0.1 s."""
    return command(b"PING", _TTL.pack(ttl_ds) + context)


def ttl_of(ping_data: bytes) -> float:
    """The TTL a PING's data (after its name) announces, in seconds."""
    return float(_TTL.unpack_from(ping_data)[0]) / 10 if len(ping_data) >= 2 else 0.0
