"""The envelope and chunk assembly that every session shares, encrypted or not (sans-IO).

A message is a 16-byte plaintext envelope ``magic(2) | version(1) | flags(1) | counter(8) |
frame_count(4)`` (big-endian) and its frames. A message holding more than the chunk size
travels as a head and chunk parts under one counter (:mod:`sl_pipeline.chunked`), in both
modes: so no frame on the wire is ever much bigger than a chunk, and a worker can set
ZeroMQ's ``MAXMSGSIZE`` to about one chunk (see ``transport.max_frame_bytes``). What a
session does to one piece (seal with AES-GCM, or nothing) is its subclass's business.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, Final

from sl_pipeline.chunked import (
    DEFAULT_CHUNK_BYTES,
    Assembly,
    check_chunk_bytes,
    chunk_views,
    layout,
    parse_layout,
    pieces,
)
from sl_pipeline.errors import ConfigError, CryptoError, LimitError, ReplayError

Buffer = bytes | bytearray | memoryview
DEFAULT_REKEY_INTERVAL: Final = 2**20
DEFAULT_MAX_FRAMES: Final = 1024
ENVELOPE_MAGIC: Final = b"SL"
ENVELOPE_VERSION: Final = 2  # 2: chunked messages (FLAG_CHUNKED parts) besides v1's
FLAG_PLAINTEXT: Final = 0x01
FLAG_CHUNKED: Final = 0x02
FLAG_FINAL: Final = 0x04
DEFAULT_MAX_CHUNKED_BYTES: Final = 2**30  # a chunked message's whole payload, by default
ENVELOPE: Final = struct.Struct(">2sBBQI")
ENVELOPE_SIZE: Final = ENVELOPE.size  # 16
# Noise reserves nonce 2^64-1 for REKEY; we stop one short so no counter is ever reused.
COUNTER_LIMIT: Final = 2**64 - 1
MAX_FRAMES_LIMIT: Final = 2**32 - 1
Parsed = tuple[bytes, int, int, int]  # envelope, flags, counter, frame count or part index


def check_session_limits(rekey_interval: int, max_frames: int) -> None:
    if rekey_interval < 1:
        raise ConfigError(f"rekey_interval must be >= 1 message, got {rekey_interval}")
    if not 1 <= max_frames <= MAX_FRAMES_LIMIT:
        raise ConfigError(f"max_frames must be in 1..{MAX_FRAMES_LIMIT}, got {max_frames}")


def byte_view(buffer: Buffer, index: int) -> memoryview:
    view = memoryview(buffer)
    if view.ndim == 1 and view.format in ("B", "b", "c"):
        return view
    try:
        return view.cast("B")
    except TypeError:
        raise LimitError(
            f"buffer {index} is not contiguous", hint="call .contiguous() on the tensor first"
        ) from None


class EnvelopeChannel:
    """Envelope checks, counters and chunking, shared by the encrypted and plaintext session.

    A subclass says what one piece costs on the wire (``_tag``) and how it is sealed and
    opened (``_send_keys``, ``_seal_piece``, ``_recv_keys``, ``_open_piece``, ``_commit``).
    """

    _flags = 0
    _tag = 0  # bytes a sealed piece adds

    def __init__(
        self, remote_static: bytes, handshake_hash: bytes, max_frames: int, chunk_bytes: int
    ) -> None:
        self.remote_static = remote_static
        self.handshake_hash = handshake_hash
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self._max_frames = max_frames
        self._send_counter = 0
        self._recv_counter = 0
        self._assembly: tuple[Assembly, Any] | None = None

    # ---- to override -----------------------------------------------------------------
    def seal(self, buffers: Sequence[Buffer]) -> list[Any]:
        raise NotImplementedError

    def open(self, frames: Sequence[Buffer], parsed: Parsed | None = None) -> list[bytearray]:
        raise NotImplementedError

    def _seal_views(self, views: Sequence[memoryview]) -> Sequence[Buffer]:
        """:meth:`seal` of buffers already made byte views (by :meth:`seal_parts`)."""
        return self.seal(views)

    def _send_keys(self, counter: int) -> Any:
        return None

    def _seal_piece(
        self, keys: Any, counter: int, envelope: bytes, index: int, view: memoryview
    ) -> Buffer:
        return view

    def _recv_keys(self, counter: int) -> Any:
        return None

    def _open_piece(
        self,
        keys: Any,
        counter: int,
        envelope: bytes,
        index: int,
        view: memoryview,
        out: memoryview,
    ) -> None:
        out[:] = view

    def _commit_send(self, keys: Any) -> None:
        return None

    def _commit_recv(self, keys: Any) -> None:
        return None

    # ---- the envelope ----------------------------------------------------------------
    def _envelope(self, buffers: Sequence[Buffer]) -> bytes:
        if not 1 <= len(buffers) <= self._max_frames:
            raise LimitError(
                f"cannot seal {len(buffers)} buffers; allowed 1..{self._max_frames}",
                hint="send b'' for an empty message, or raise max_frames on both sides",
            )
        if self._send_counter >= COUNTER_LIMIT:
            raise CryptoError("message counter exhausted", hint="reconnect to run a new handshake")
        return ENVELOPE.pack(
            ENVELOPE_MAGIC, ENVELOPE_VERSION, self._flags, self._send_counter, len(buffers)
        )

    def _parse_envelope(self, frames: Sequence[Buffer]) -> Parsed:
        """Frame 0 checked for size, magic and version: ``(envelope, flags, counter, count)``."""
        if len(frames) > self._max_frames + 1:
            raise LimitError(
                f"message has {len(frames)} frames; the limit is {self._max_frames + 1}",
                hint="raise max_frames on both sides if this is expected",
            )
        if len(frames) < 2:
            raise CryptoError(f"message has {len(frames)} frames; it was truncated")
        size = memoryview(frames[0]).nbytes  # check before copying anything a peer sent
        if size != ENVELOPE_SIZE:
            raise CryptoError(f"envelope is {size} bytes, expected {ENVELOPE_SIZE}")
        envelope = bytes(frames[0])
        magic, version, flags, counter, count = ENVELOPE.unpack(envelope)
        if magic != ENVELOPE_MAGIC or version != ENVELOPE_VERSION:
            raise CryptoError(
                f"not an sl-pipeline v{ENVELOPE_VERSION} message (magic {magic!r}, v{version})",
                hint="both peers must run compatible sl-pipeline versions",
            )
        if flags & ~(FLAG_CHUNKED | FLAG_FINAL) != self._flags:
            raise CryptoError(
                f"envelope flags {flags:#04x}, expected {self._flags:#04x}",
                hint="both peers must agree on --insecure",
            )
        return envelope, flags, counter, count

    def _check_counter(self, counter: int) -> None:
        if counter != self._recv_counter:
            what = "replayed or reordered" if counter < self._recv_counter else "messages lost"
            raise ReplayError(
                f"message counter {counter}, expected {self._recv_counter} ({what})",
                hint="the message was dropped; the session stays usable",
            )

    def _check_envelope(self, frames: Sequence[Buffer], parsed: Parsed | None = None) -> bytes:
        """Validate frame 0 of a one-part message against its frames; returns the envelope."""
        envelope, flags, counter, count = parsed or self._parse_envelope(frames)
        if flags & FLAG_CHUNKED:
            raise CryptoError(
                f"chunk {count} of message {counter} given where a whole message was expected",
                hint="pass chunked messages through feed()",
            )
        if count != len(frames) - 1:
            raise CryptoError(f"envelope announces {count} frames but {len(frames) - 1} arrived")
        self._check_counter(counter)
        return envelope

    # ---- chunked messages: sending ---------------------------------------------------
    def seal_parts(self, buffers: Sequence[Buffer]) -> Iterator[Sequence[Buffer]]:
        """The ZeroMQ messages that carry ``buffers``: one, or a head and its chunk parts if
        they hold more than ``chunk_bytes``. Chunks are sealed one at a time as the iterator
        is consumed, so a caller sending each part at once overlaps sealing with sending.
        The message counter is taken now: seal nothing else until the iterator is done."""
        views = [byte_view(buffer, index) for index, buffer in enumerate(buffers, start=1)]
        sizes = [view.nbytes for view in views]
        if sum(sizes) <= self.chunk_bytes:
            return iter([self._seal_views(views)])
        self._envelope(views)  # the frame count and counter limits
        counter = self._send_counter
        keys = self._send_keys(counter)
        plan = pieces(sizes, self.chunk_bytes)
        if len(plan) >= MAX_FRAMES_LIMIT:
            raise LimitError(f"message needs {len(plan)} chunks; raise the chunk size")
        head = self._seal_part(keys, counter, 0, False, layout(sizes, self.chunk_bytes))
        self._commit_send(keys)
        self._send_counter += 1
        chunks = (
            self._seal_part(keys, counter, part, part == len(plan), view)
            for part, view in enumerate(chunk_views(views, plan), start=1)
        )
        return _chain(head, chunks)

    def _seal_part(
        self, keys: Any, counter: int, part: int, final: bool, plain: Buffer
    ) -> Sequence[Buffer]:
        flags = self._flags | FLAG_CHUNKED | (FLAG_FINAL if final else 0)
        envelope = ENVELOPE.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, flags, counter, part)
        return [envelope, self._seal_piece(keys, counter, envelope, part + 1, memoryview(plain))]

    # ---- chunked messages: receiving -------------------------------------------------
    def feed(
        self, frames: Sequence[Buffer], max_bytes: int = DEFAULT_MAX_CHUNKED_BYTES
    ) -> Sequence[Buffer] | None:
        """One received ZeroMQ message: the plaintext buffers once a message is complete,
        ``None`` while a chunked message still lacks parts. ``max_bytes`` bounds what a
        chunked head may announce (checked before anything is allocated)."""
        parsed = self._parse_envelope(frames)
        if not parsed[1] & FLAG_CHUNKED:
            return self.open(frames, parsed)
        try:
            return self._open_part(frames, parsed, max_bytes)
        except CryptoError:
            self._assembly = None  # the message is lost; later parts of it are refused
            raise

    def _open_part(
        self, frames: Sequence[Buffer], parsed: Parsed, max_bytes: int
    ) -> Sequence[Buffer] | None:
        envelope, flags, counter, part = parsed
        if len(frames) != 2:
            raise CryptoError(f"chunk part has {len(frames) - 1} sealed frames; expected 1")
        view = byte_view(frames[1], 1)
        if part == 0:
            self._open_head(envelope, flags, counter, view, max_bytes)
            return None
        if self._assembly is None:
            self._check_counter(counter)  # an old message's chunk reads as a replay
            raise ReplayError(
                f"chunk {part} of message {counter} arrived without its head (lost, or its "
                "message was already refused)",
                hint="the message was dropped; the sender must send it again",
            )
        assembly, keys = self._assembly
        final = bool(flags & FLAG_FINAL)
        target = assembly.target(counter, part, final, view.nbytes - self._tag)
        self._open_piece(keys, counter, envelope, part + 1, view, target)
        assembly.advance()
        if part < assembly.parts:
            return None
        self._assembly = None
        self._commit_recv(keys)
        self._recv_counter += 1
        return assembly.outputs

    def _open_head(
        self, envelope: bytes, flags: int, counter: int, view: memoryview, max_bytes: int
    ) -> None:
        self._abandon_assembly()
        self._check_counter(counter)
        if flags & FLAG_FINAL or view.nbytes < self._tag:
            raise CryptoError(f"chunked head of message {counter} is malformed")
        keys = self._recv_keys(counter)
        plain = bytearray(view.nbytes - self._tag)
        self._open_piece(keys, counter, envelope, 1, view, memoryview(plain))
        chunk_bytes, sizes = parse_layout(bytes(plain), self._max_frames, max_bytes)
        assembly = Assembly.start(counter, chunk_bytes, sizes)
        if assembly.parts == 0:
            raise CryptoError(f"chunked head of message {counter} announces no chunks")
        self._assembly = (assembly, keys)

    def _abandon_assembly(self) -> None:
        """A new message while a chunked one is incomplete: that one was truncated."""
        if self._assembly is not None:
            assembly = self._assembly[0]
            self._assembly = None
            raise ReplayError(
                f"message {assembly.counter} ended after {assembly.next_part - 1} of its "
                f"{assembly.parts} chunks (truncated)",
                hint="the message was dropped; the sender must send it again",
            )


def _chain(head: Sequence[Buffer], rest: Iterator[Sequence[Buffer]]) -> Iterator[Sequence[Buffer]]:
    yield head
    yield from rest


__all__ = ["DEFAULT_CHUNK_BYTES", "EnvelopeChannel"]
