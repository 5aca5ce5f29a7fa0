"""ZMTP 3.x wire pieces (RFC 23/37): greeting, frame headers, commands, metadata. Pure.

The codec that reads them is :mod:`sl_pipeline.zmtp`; these build what it writes (and what
tests send as a hostile peer would).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
GREETING_BYTES = 64
_LONG = struct.Struct(">BQ")
_TTL = struct.Struct(">H")
_PROPERTY_SIZE = struct.Struct(">I")


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
