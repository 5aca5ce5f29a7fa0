"""Chunked sealing of large messages (envelope version 2): pure code, no I/O.

A message whose buffers hold more than ``chunk_bytes`` in all travels as ``P + 1`` ZeroMQ
messages under one message counter: a *head* whose one sealed frame is the layout
(``chunk_bytes(4) | n(4) | n x size(8)``, big-endian), then ``P`` *chunk parts* of one sealed
frame each, every buffer cut into pieces of at most ``chunk_bytes`` in order. Part ``p``
carries the envelope ``magic | version | flags | counter | p`` with ``FLAG_CHUNKED`` (and
``FLAG_FINAL`` on part ``P``), nonce ``p+1 (4) || counter (8)`` and associated data
``envelope || p+1 (4)``. So each chunk is authenticated with its message, its index and (the
head fixing ``P``) the whole message's length; a chunk that is altered, moved, repeated or
missing is refused. Separate ZeroMQ messages let the sender's I/O thread send chunk ``k``
while the sender seals chunk ``k+1``, and the receiver open chunk ``k`` while ``k+1`` is still
arriving, into buffers allocated once from the head's layout. See docs/protocol.md.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from sl_pipeline.errors import CryptoError, LimitError, ReplayError

DEFAULT_CHUNK_BYTES: Final = 1024 * 1024  # from the chunk-size table in docs/performance.md
MIN_CHUNK_BYTES: Final = 4 * 1024
MAX_CHUNK_BYTES: Final = 64 * 1024 * 1024
POOLED_FROM: Final = 64 * 1024  # smaller pieces (heads, headers, a last piece) are not pooled
_LAYOUT = struct.Struct(">II")
_SIZE = struct.Struct(">Q")

Piece = tuple[int, int, int]  # (buffer index, start, stop)


def check_chunk_bytes(chunk_bytes: int) -> int:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise LimitError(
            f"chunk size {chunk_bytes} bytes is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}",
            hint="the peer is not speaking sl-pipeline's chunked format",
        )
    return chunk_bytes


def pieces(sizes: Sequence[int], chunk_bytes: int) -> list[Piece]:
    """Every buffer cut into pieces of at most ``chunk_bytes``, in order (empty: none)."""
    return [
        (index, start, min(size, start + chunk_bytes))
        for index, size in enumerate(sizes)
        for start in range(0, size, chunk_bytes)
    ]


def layout(sizes: Sequence[int], chunk_bytes: int) -> bytes:
    return _LAYOUT.pack(chunk_bytes, len(sizes)) + b"".join(_SIZE.pack(s) for s in sizes)


def parse_layout(plain: bytes, max_buffers: int, max_bytes: int) -> tuple[int, list[int]]:
    """``(chunk_bytes, sizes)`` from a head's opened layout, every limit checked before any
    buffer is allocated."""
    if len(plain) < _LAYOUT.size:
        raise CryptoError(f"chunked head is {len(plain)} bytes, shorter than its layout")
    chunk_bytes, count = _LAYOUT.unpack_from(plain)
    check_chunk_bytes(chunk_bytes)
    if not 1 <= count <= max_buffers:
        raise LimitError(f"chunked message has {count} buffers; allowed 1..{max_buffers}")
    if len(plain) != _LAYOUT.size + count * _SIZE.size:
        raise CryptoError(f"chunked head is {len(plain)} bytes; its {count} sizes disagree")
    sizes = [_SIZE.unpack_from(plain, _LAYOUT.size + i * _SIZE.size)[0] for i in range(count)]
    if sum(sizes) > max_bytes:
        raise LimitError(f"chunked message carries {sum(sizes)} bytes; the limit is {max_bytes}")
    return chunk_bytes, sizes


def empty_buffer(nbytes: int) -> memoryview:
    """A writable buffer that is not zero-filled first (the AEAD pass writes every byte)."""
    view: memoryview = np.empty(nbytes, dtype=np.uint8).data
    return view


def _holders(buffers: list[np.ndarray], index: int) -> int:
    """The reference count of ``buffers[index]``, as this interpreter counts it here."""
    return sys.getrefcount(buffers[index])


_FREE: Final = _holders([np.empty(0, dtype=np.uint8)], 0)  # a buffer that only its list holds


class PieceBuffers:
    """Buffers that a sender seals chunk pieces into, reused once nothing else holds them.

    A sealed piece is sent zero-copy: ZeroMQ (until its I/O thread has written it) or the event
    loop's transport (while the kernel has not taken it all) keep a reference to it, through
    the memoryview handed out. A buffer is handed out again only when its reference count
    says this object alone holds it, so a piece in flight is never overwritten. A fresh 1 MiB
    buffer per piece made glibc give the pages back and fault them in again: up to 500 page
    faults (about 2 ms here) per 1 MiB message (docs/performance.md, "Eleventh session").
    At most ``slots`` buffers are kept; beyond them, and below ``POOLED_FROM`` bytes (which
    malloc serves from its free lists without faults), a piece gets a buffer of its own.
    """

    def __init__(self, slots: int = 2) -> None:
        self._buffers: list[np.ndarray] = []
        self._slots = slots

    def take(self, nbytes: int, capacity: int) -> memoryview:
        """``nbytes`` of a buffer of at least ``capacity`` bytes that nothing else holds."""
        if nbytes < POOLED_FROM:
            return empty_buffer(nbytes)
        buffers = self._buffers
        for index in range(len(buffers)):
            if buffers[index].nbytes >= nbytes and _holders(buffers, index) == _FREE:
                view: memoryview = buffers[index].data
                return view[:nbytes]
        buffer = np.empty(max(nbytes, capacity), dtype=np.uint8)
        if len(self._buffers) < self._slots:
            self._buffers.append(buffer)
        fresh: memoryview = buffer.data
        return fresh[:nbytes]


@dataclass
class Assembly:
    """A chunked message being received: the head's layout and the buffers it fills.

    The pieces are found as they come (they come in order), never listed up front: a head
    of a few bytes may announce a million 4 KiB chunks, and listing them cost the receiver
    0.1-0.7 s and 17 MiB before any of them arrived."""

    counter: int
    chunk_bytes: int
    sizes: list[int]
    outputs: list[memoryview]
    parts: int
    next_part: int = 1
    _buffer: int = 0  # the buffer the next piece goes into
    _start: int = 0  # where in it

    @classmethod
    def start(cls, counter: int, chunk_bytes: int, sizes: list[int]) -> Assembly:
        parts = sum(-(-size // chunk_bytes) for size in sizes)
        return cls(counter, chunk_bytes, sizes, [empty_buffer(s) for s in sizes], parts)

    def _piece(self) -> Piece:
        """The next piece: (buffer index, start, stop); empty buffers have none."""
        index, start = self._buffer, self._start
        while start >= self.sizes[index]:
            index, start = index + 1, 0
        return index, start, min(self.sizes[index], start + self.chunk_bytes)

    def advance(self) -> None:
        """The piece :meth:`target` gave was filled: the next one is due."""
        self._buffer, _, self._start = self._piece()
        self.next_part += 1

    def target(self, counter: int, part: int, final: bool, nbytes: int) -> memoryview:
        """Where chunk ``part`` goes; refuses any chunk out of order, extra or misplaced."""
        if counter != self.counter:
            raise ReplayError(
                f"message {self.counter} ended after {self.next_part - 1} of its {self.parts} "
                f"chunks: message {counter} arrived (truncated)",
                hint="the message was dropped; the sender must send it again",
            )
        if part != self.next_part:
            what = "repeated" if part < self.next_part else "reordered or lost"
            raise ReplayError(
                f"chunk {part} of message {counter} arrived where chunk {self.next_part} was "
                f"due ({what})",
                hint="the message was dropped; the sender must send it again",
            )
        if final != (part == self.parts):
            raise CryptoError(
                f"chunk {part} of message {counter}: final flag {final}, but the head "
                f"announced {self.parts} chunks"
            )
        index, start, stop = self._piece()
        if nbytes != stop - start:
            raise CryptoError(
                f"chunk {part} of message {counter} is {nbytes} bytes, its layout says "
                f"{stop - start}"
            )
        return self.outputs[index][start:stop]


def chunk_views(buffers: Sequence[memoryview], plan: list[Piece]) -> Iterator[memoryview]:
    for index, start, stop in plan:
        yield buffers[index][start:stop]


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Assembly",
    "PieceBuffers",
    "check_chunk_bytes",
    "layout",
    "pieces",
]
