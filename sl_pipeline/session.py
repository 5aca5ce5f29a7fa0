"""The transport phase of a Noise session: sealing and opening multipart messages.

Sans-IO. A :class:`Session` seals a multipart message as a 16-byte plaintext envelope
``magic(2) | version(1) | flags(1) | counter(8) | frame_count(4)`` (big-endian) plus one
AES-256-GCM ciphertext per buffer; frame ``i`` >= 1 uses nonce ``i(4) || counter(8)`` and
associated data ``envelope || i(4)``, so every byte, the frame order and the frame count are
authenticated. A message larger than the chunk size travels as a sequence of chunk parts
instead (:mod:`sl_pipeline.chunked`): :meth:`Session.seal_parts` and :meth:`Session.feed`.
:class:`PlainSession` keeps the envelope checks without encryption (``--insecure`` only).
Sessions come from the handshake in :mod:`sl_pipeline.crypto`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sl_pipeline.chunked import (
    DEFAULT_CHUNK_BYTES,
    Assembly,
    check_chunk_bytes,
    chunk_views,
    empty_buffer,
    layout,
    parse_layout,
    pieces,
)
from sl_pipeline.errors import BadTagError, ConfigError, CryptoError, LimitError, ReplayError

Buffer = bytes | bytearray | memoryview
_TAGLEN = 16
DEFAULT_REKEY_INTERVAL: Final = 2**20
DEFAULT_MAX_FRAMES: Final = 1024
ENVELOPE_MAGIC: Final = b"SL"
ENVELOPE_VERSION: Final = 2  # 2: chunked messages (FLAG_CHUNKED parts) besides v1's
FLAG_PLAINTEXT: Final = 0x01
FLAG_CHUNKED: Final = 0x02
FLAG_FINAL: Final = 0x04
DEFAULT_MAX_CHUNKED_BYTES: Final = 2**30  # a chunked message's whole payload, by default
_ENVELOPE = struct.Struct(">2sBBQI")
ENVELOPE_SIZE: Final = _ENVELOPE.size  # 16
_NONCE = struct.Struct(">IQ")
_INDEX = struct.Struct(">I")
# Noise reserves nonce 2^64-1 for REKEY; we stop one short so no counter is ever reused.
_COUNTER_LIMIT = 2**64 - 1
_MAX_FRAMES_LIMIT = 2**32 - 1
_REKEY_NONCE = b"\x00" * 4 + b"\xff" * 8
_Parsed = tuple[bytes, int, int, int]  # envelope, flags, counter, frame count or part index
_ZEROS32 = bytes(32)


def _check_session_limits(rekey_interval: int, max_frames: int) -> None:
    if rekey_interval < 1:
        raise ConfigError(f"rekey_interval must be >= 1 message, got {rekey_interval}")
    if not 1 <= max_frames <= _MAX_FRAMES_LIMIT:
        raise ConfigError(f"max_frames must be in 1..{_MAX_FRAMES_LIMIT}, got {max_frames}")


def _byte_view(buffer: Buffer, index: int) -> memoryview:
    view = memoryview(buffer)
    if view.ndim == 1 and view.format in ("B", "b", "c"):
        return view
    try:
        return view.cast("B")
    except TypeError:
        raise LimitError(
            f"buffer {index} is not contiguous", hint="call .contiguous() on the tensor first"
        ) from None


def _key_for(current: tuple[bytes, AESGCM], counter: int, interval: int) -> tuple[bytes, AESGCM]:
    """Key for message ``counter``: both sides rekey before every ``interval``-th message."""
    if counter == 0 or counter % interval:
        return current
    # Noise REKEY: k' = first 32 bytes of ENCRYPT(k, 2^64-1, empty ad, 32 zero bytes).
    # Transport frames use index >= 1, so this nonce never collides with theirs.
    new_key = current[1].encrypt(_REKEY_NONCE, _ZEROS32, None)[:32]
    return new_key, AESGCM(new_key)


class _Channel:
    """Envelope handling shared by the encrypted and the plaintext session."""

    _flags = 0

    def __init__(self, remote_static: bytes, handshake_hash: bytes, max_frames: int) -> None:
        self.remote_static = remote_static
        self.handshake_hash = handshake_hash
        self._max_frames = max_frames
        self._send_counter = 0
        self._recv_counter = 0

    def _envelope(self, buffers: Sequence[Buffer]) -> bytes:
        if not 1 <= len(buffers) <= self._max_frames:
            raise LimitError(
                f"cannot seal {len(buffers)} buffers; allowed 1..{self._max_frames}",
                hint="send b'' for an empty message, or raise max_frames on both sides",
            )
        if self._send_counter >= _COUNTER_LIMIT:
            raise CryptoError("message counter exhausted", hint="reconnect to run a new handshake")
        return _ENVELOPE.pack(
            ENVELOPE_MAGIC, ENVELOPE_VERSION, self._flags, self._send_counter, len(buffers)
        )

    def _parse_envelope(self, frames: Sequence[Buffer]) -> _Parsed:
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
        magic, version, flags, counter, count = _ENVELOPE.unpack(envelope)
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

    def _check_envelope(self, frames: Sequence[Buffer], parsed: _Parsed | None = None) -> bytes:
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


class Session(_Channel):
    """Transport phase: seals and opens multipart messages with one key per direction.

    Not thread-safe; use one Session per peer connection from one task.
    """

    def __init__(
        self,
        *,
        send_key: bytes,
        recv_key: bytes,
        remote_static: bytes,
        handshake_hash: bytes,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        max_frames: int = DEFAULT_MAX_FRAMES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        _check_session_limits(rekey_interval, max_frames)
        super().__init__(remote_static, handshake_hash, max_frames)
        self._rekey_interval = rekey_interval
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        # (key, cipher) per direction; replaced only after a message fully succeeds.
        self._send = (send_key, AESGCM(send_key))
        self._recv = (recv_key, AESGCM(recv_key))
        self._assembly: tuple[Assembly, tuple[bytes, AESGCM]] | None = None

    def seal(self, buffers: Sequence[Buffer]) -> list[bytes | bytearray]:
        """Encrypt ``buffers`` into ``[envelope, ciphertext_1, ..., ciphertext_n]``.

        Each ciphertext is a fresh bytearray, so it may be sent zero-copy and left in flight.
        """
        envelope = self._envelope(buffers)
        counter = self._send_counter
        key, aead = _key_for(self._send, counter, self._rekey_interval)
        frames: list[bytes | bytearray] = [envelope]
        for index, buffer in enumerate(buffers, start=1):
            view = _byte_view(buffer, index)
            out = bytearray(view.nbytes + _TAGLEN)
            aad = envelope + _INDEX.pack(index)
            aead.encrypt_into(_NONCE.pack(index, counter), view, aad, out)
            frames.append(out)
        self._send = (key, aead)
        self._send_counter += 1
        return frames

    def seal_parts(self, buffers: Sequence[Buffer]) -> Iterator[Sequence[Buffer]]:
        """The ZeroMQ messages that carry ``buffers``: one, or a head and its chunk parts if
        they hold more than ``chunk_bytes``. Chunks are sealed one at a time as the iterator
        is consumed, so a caller sending each part at once overlaps sealing with sending.
        The message counter is taken now: seal nothing else until the iterator is done."""
        views = [_byte_view(buffer, index) for index, buffer in enumerate(buffers, start=1)]
        sizes = [view.nbytes for view in views]
        if sum(sizes) <= self.chunk_bytes:
            return iter([self.seal(views)])
        self._envelope(views)  # the frame count and counter limits
        counter = self._send_counter
        key, aead = _key_for(self._send, counter, self._rekey_interval)
        plan = pieces(sizes, self.chunk_bytes)
        if len(plan) >= _MAX_FRAMES_LIMIT:
            raise LimitError(f"message needs {len(plan)} chunks; raise the chunk size")
        head = self._seal_part(aead, counter, 0, False, layout(sizes, self.chunk_bytes))
        self._send = (key, aead)
        self._send_counter += 1
        chunks = (
            self._seal_part(aead, counter, part, part == len(plan), view)
            for part, view in enumerate(chunk_views(views, plan), start=1)
        )
        return _chain(head, chunks)

    def _seal_part(
        self, aead: AESGCM, counter: int, part: int, final: bool, plain: Buffer
    ) -> Sequence[Buffer]:
        flags = self._flags | FLAG_CHUNKED | (FLAG_FINAL if final else 0)
        envelope = _ENVELOPE.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, flags, counter, part)
        view = memoryview(plain)
        out = empty_buffer(view.nbytes + _TAGLEN)
        aead.encrypt_into(
            _NONCE.pack(part + 1, counter), view, envelope + _INDEX.pack(part + 1), out
        )
        return [envelope, out]

    def open(self, frames: Sequence[Buffer], parsed: _Parsed | None = None) -> list[bytearray]:
        """Authenticate and decrypt a one-part message; returns writable plaintext buffers.

        Any failure raises (ReplayError for counter problems, CryptoError otherwise) and
        leaves the session unchanged, so the next genuine message still opens.
        """
        self._abandon_assembly()
        envelope = self._check_envelope(frames, parsed)
        counter = self._recv_counter
        key, aead = _key_for(self._recv, counter, self._rekey_interval)
        plaintexts: list[bytearray] = []
        for index in range(1, len(frames)):
            view = _byte_view(frames[index], index)
            if view.nbytes < _TAGLEN:
                raise CryptoError(f"frame {index} is shorter than an authentication tag")
            out = bytearray(view.nbytes - _TAGLEN)
            _decrypt_into(aead, counter, index, envelope, view, memoryview(out))
            plaintexts.append(out)
        self._recv = (key, aead)
        self._recv_counter += 1
        return plaintexts

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
        self, frames: Sequence[Buffer], parsed: _Parsed, max_bytes: int
    ) -> Sequence[Buffer] | None:
        envelope, flags, counter, part = parsed
        if len(frames) != 2:
            raise CryptoError(f"chunk part has {len(frames) - 1} sealed frames; expected 1")
        view = _byte_view(frames[1], 1)
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
        assembly, keyed = self._assembly
        final = bool(flags & FLAG_FINAL)
        target = assembly.target(counter, part, final, view.nbytes - _TAGLEN)
        _decrypt_into(keyed[1], counter, part + 1, envelope, view, target)
        assembly.next_part += 1
        if part < assembly.parts:
            return None
        self._assembly = None
        self._recv = keyed
        self._recv_counter += 1
        return assembly.outputs

    def _open_head(
        self, envelope: bytes, flags: int, counter: int, view: memoryview, max_bytes: int
    ) -> None:
        self._abandon_assembly()
        self._check_counter(counter)
        if flags & FLAG_FINAL or view.nbytes < _TAGLEN:
            raise CryptoError(f"chunked head of message {counter} is malformed")
        keyed = _key_for(self._recv, counter, self._rekey_interval)
        plain = empty_buffer(view.nbytes - _TAGLEN)
        _decrypt_into(keyed[1], counter, 1, envelope, view, plain)
        chunk_bytes, sizes = parse_layout(bytes(plain), self._max_frames, max_bytes)
        assembly = Assembly.start(counter, chunk_bytes, sizes)
        if assembly.parts == 0:
            raise CryptoError(f"chunked head of message {counter} announces no chunks")
        self._assembly = (assembly, keyed)

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


def _decrypt_into(
    aead: AESGCM, counter: int, index: int, envelope: bytes, view: memoryview, out: memoryview
) -> None:
    try:
        aead.decrypt_into(_NONCE.pack(index, counter), view, envelope + _INDEX.pack(index), out)
    except InvalidTag:
        raise BadTagError(
            f"frame {index} of message {counter} failed authentication",
            hint="the message was altered in transit or sent under another session",
        ) from None


class PlainSession(_Channel):
    """No encryption, for ``--insecure`` only. Still checks counters and frame counts.

    Gives no confidentiality or integrity against an attacker: it only detects accidental
    loss, duplication and truncation.
    """

    _flags = FLAG_PLAINTEXT

    def __init__(self, *, remote_static: bytes = b"", max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        _check_session_limits(1, max_frames)
        super().__init__(remote_static, b"", max_frames)

    def seal(self, buffers: Sequence[Buffer]) -> list[bytes | bytearray | memoryview]:
        """``[envelope, *buffers]``; buffers go out as they are (no copy)."""
        envelope = self._envelope(buffers)
        frames: list[bytes | bytearray | memoryview] = [envelope]
        for index, buffer in enumerate(buffers, start=1):
            frames.append(_byte_view(buffer, index) if isinstance(buffer, memoryview) else buffer)
        self._send_counter += 1
        return frames

    def open(self, frames: Sequence[Buffer]) -> list[bytearray]:
        """Check the envelope; returns writable copies (frames may be read-only)."""
        self._check_envelope(frames)
        plaintexts = [bytearray(frame) for frame in frames[1:]]
        self._recv_counter += 1
        return plaintexts

    def seal_parts(
        self, buffers: Sequence[Buffer]
    ) -> Iterator[list[bytes | bytearray | memoryview]]:
        """Always one part: chunking exists to overlap encryption, which this session skips."""
        return iter([self.seal(buffers)])

    def feed(
        self, frames: Sequence[Buffer], max_bytes: int = DEFAULT_MAX_CHUNKED_BYTES
    ) -> list[bytearray]:
        """The same as :meth:`open` (a chunk part is refused: nobody sends one in plaintext)."""
        return self.open(frames)


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_REKEY_INTERVAL",
    "ENVELOPE_SIZE",
    "PlainSession",
    "Session",
]
