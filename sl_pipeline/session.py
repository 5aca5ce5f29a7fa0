"""The transport phase of a Noise session: sealing and opening multipart messages.

Sans-IO. A :class:`Session` seals a multipart message as a 16-byte plaintext envelope
``magic(2) | version(1) | flags(1) | counter(8) | frame_count(4)`` (big-endian) plus one
ciphertext per buffer, under the suite the handshake chose (:mod:`sl_pipeline.ciphers`:
AES-256-GCM or AES-128-OCB3, 16-byte tags both); frame ``i`` >= 1 uses nonce ``i(4) ||
counter(8)`` and associated data ``envelope || i(4)``, so every byte, the frame order and the
frame count are authenticated. A message larger than the chunk size travels as a sequence of
chunk parts instead (:mod:`sl_pipeline.chunked`, :mod:`sl_pipeline.envelope`):
:meth:`Session.seal_parts` and :meth:`Session.feed`. :class:`PlainSession` keeps the envelope
checks and the chunking without encryption (``--insecure`` only). Sessions come from the
handshake in :mod:`sl_pipeline.crypto`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sl_pipeline.chunked import DEFAULT_CHUNK_BYTES, PieceBuffers
from sl_pipeline.ciphers import AES256_GCM, TAG_BYTES, Aead, CipherSuite
from sl_pipeline.envelope import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_REKEY_INTERVAL,
    ENVELOPE_SIZE,
    FLAG_PLAINTEXT,
    Buffer,
    EnvelopeChannel,
    Parsed,
    byte_view,
    check_session_limits,
)
from sl_pipeline.errors import BadTagError, CryptoError

_TAGLEN = TAG_BYTES
_NONCE = struct.Struct(">IQ")
_INDEX = struct.Struct(">I")
_REKEY_NONCE = b"\x00" * 4 + b"\xff" * 8
_ZEROS32 = bytes(32)
_check_session_limits = check_session_limits  # the name crypto.py imports
Keyed = tuple[bytes, Aead]  # (the 32-byte key, the suite's AEAD keyed from it)


def _key_for(current: Keyed, counter: int, interval: int, suite: CipherSuite) -> Keyed:
    """Key for message ``counter``: both sides rekey before every ``interval``-th message."""
    if counter == 0 or counter % interval:
        return current
    # Noise REKEY with AESGCM in every suite, over the full 32-byte key: k' = first 32 bytes
    # of ENCRYPT(k, 2^64-1, empty ad, 32 zero bytes), so the key chain is the one Noise
    # defines whichever AEAD seals the messages. Transport frames use index >= 1, so this
    # nonce never collides with theirs (in the aes256-gcm suite the key is the same).
    new_key = AESGCM(current[0]).encrypt(_REKEY_NONCE, _ZEROS32, None)[:32]
    return new_key, suite.aead(new_key)


class Session(EnvelopeChannel):
    """Transport phase: seals and opens multipart messages with one key per direction.

    Not thread-safe; use one Session per peer connection from one task.
    """

    _tag = _TAGLEN

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
        cipher: CipherSuite = AES256_GCM,
    ) -> None:
        check_session_limits(rekey_interval, max_frames)
        super().__init__(remote_static, handshake_hash, max_frames, chunk_bytes)
        self._rekey_interval = rekey_interval
        self.cipher = cipher
        # (key, AEAD) per direction; replaced only after a message fully succeeds.
        self._send: Keyed = (send_key, cipher.aead(send_key))
        self._recv: Keyed = (recv_key, cipher.aead(recv_key))
        self._pieces = PieceBuffers()  # what chunk pieces are sealed into, reused

    @property
    def cipher_name(self) -> str:
        """The suite's name, as a joined peer's log line and the welcome give it."""
        return self.cipher.name

    def seal(self, buffers: Sequence[Buffer]) -> list[bytes | bytearray]:
        """Encrypt ``buffers`` into ``[envelope, ciphertext_1, ..., ciphertext_n]``.

        Each ciphertext is a fresh bytearray, so it may be sent zero-copy and left in flight.
        (Zero-filling it first costs nothing measurable: the AEAD's writes then find the
        lines in cache; docs/performance.md, "Eleventh session".)
        """
        return self._seal_views([byte_view(buffer, i) for i, buffer in enumerate(buffers, 1)])

    def _seal_views(self, views: Sequence[memoryview]) -> list[bytes | bytearray]:
        # The hot path of every message: one AEAD call per buffer and little else.
        envelope = self._envelope(views)
        counter = self._send_counter
        keyed = self._send
        if not counter % self._rekey_interval:
            keyed = _key_for(keyed, counter, self._rekey_interval, self.cipher)
        encrypt_into = keyed[1].encrypt_into
        frames: list[bytes | bytearray] = [envelope]
        for index, view in enumerate(views, start=1):
            out = bytearray(view.nbytes + _TAGLEN)
            nonce, aad = _NONCE.pack(index, counter), envelope + _INDEX.pack(index)
            _sealed(encrypt_into(nonce, view, aad, out), out, index)
            frames.append(out)
        self._send = keyed
        self._send_counter = counter + 1
        return frames

    def open(self, frames: Sequence[Buffer], parsed: Parsed | None = None) -> list[bytearray]:
        """Authenticate and decrypt a one-part message; returns fresh writable plaintext
        buffers, every byte of them written by the AEAD (or the message is refused).

        Any failure raises (ReplayError for counter problems, CryptoError otherwise) and
        leaves the session unchanged, so the next genuine message still opens.
        """
        if self._assembly is not None:
            self._abandon_assembly()
        envelope = self._check_envelope(frames, parsed)
        counter = self._recv_counter
        keyed = self._recv
        if not counter % self._rekey_interval:
            keyed = _key_for(keyed, counter, self._rekey_interval, self.cipher)
        decrypt_into = keyed[1].decrypt_into
        plaintexts: list[bytearray] = []
        for index in range(1, len(frames)):
            view = byte_view(frames[index], index)
            if view.nbytes < _TAGLEN:
                raise CryptoError(f"frame {index} is shorter than an authentication tag")
            out = bytearray(view.nbytes - _TAGLEN)
            try:
                written = decrypt_into(
                    _NONCE.pack(index, counter), view, envelope + _INDEX.pack(index), out
                )
            except InvalidTag:
                raise _bad_tag(index, counter) from None
            _opened(written, out, index)
            plaintexts.append(out)
        self._recv = keyed
        self._recv_counter = counter + 1
        return plaintexts

    # ---- one piece of a chunked message ------------------------------------------------
    def _send_keys(self, counter: int) -> Keyed:
        return _key_for(self._send, counter, self._rekey_interval, self.cipher)

    def _commit_send(self, keys: Any) -> None:
        self._send = keys

    def _seal_piece(
        self, keys: Any, counter: int, envelope: bytes, index: int, view: memoryview
    ) -> Buffer:
        out = self._pieces.take(view.nbytes + _TAGLEN, self.chunk_bytes + _TAGLEN)
        nonce, aad = _NONCE.pack(index, counter), envelope + _INDEX.pack(index)
        _sealed(keys[1].encrypt_into(nonce, view, aad, out), out, index)
        return out

    def _recv_keys(self, counter: int) -> Keyed:
        return _key_for(self._recv, counter, self._rekey_interval, self.cipher)

    def _commit_recv(self, keys: Any) -> None:
        self._recv = keys

    def _open_piece(
        self,
        keys: Any,
        counter: int,
        envelope: bytes,
        index: int,
        view: memoryview,
        out: memoryview,
    ) -> None:
        _decrypt_into(keys[1], counter, index, envelope, view, out)


def _bad_tag(index: int, counter: int) -> BadTagError:
    return BadTagError(
        f"frame {index} of message {counter} failed authentication",
        hint="the message was altered in transit or sent under another session",
    )


def _sealed(written: int, out: Buffer, index: int) -> None:
    """An AEAD call filled every byte of ``out`` (uninitialised memory never goes out)."""
    if written != len(out):
        raise CryptoError(f"sealing frame {index} wrote {written} of its {len(out)} bytes")


def _opened(written: int, out: Buffer, index: int) -> None:
    """An AEAD call filled every byte of ``out``: no byte of an earlier message (which an
    uninitialised buffer may hold) can reach a tensor."""
    if written != len(out):
        raise CryptoError(f"frame {index} opened to {written} of its {len(out)} bytes")


def _decrypt_into(
    aead: Aead, counter: int, index: int, envelope: bytes, view: memoryview, out: memoryview
) -> None:
    try:
        written = aead.decrypt_into(
            _NONCE.pack(index, counter), view, envelope + _INDEX.pack(index), out
        )
    except InvalidTag:
        raise _bad_tag(index, counter) from None
    _opened(written, out, index)


class PlainSession(EnvelopeChannel):
    """No encryption, for ``--insecure`` only. Still checks counters and frame counts, and
    chunks large messages like :class:`Session` (so frames stay within ``MAXMSGSIZE``).

    Gives no confidentiality or integrity against an attacker: it only detects accidental
    loss, duplication and truncation.
    """

    _flags = FLAG_PLAINTEXT
    cipher_name = "none"  # what a joined peer's log line says seals its messages

    def __init__(
        self,
        *,
        remote_static: bytes = b"",
        max_frames: int = DEFAULT_MAX_FRAMES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        check_session_limits(1, max_frames)
        super().__init__(remote_static, b"", max_frames, chunk_bytes)

    def seal(self, buffers: Sequence[Buffer]) -> list[bytes | bytearray | memoryview]:
        """``[envelope, *buffers]``; buffers go out as they are (no copy)."""
        envelope = self._envelope(buffers)
        frames: list[bytes | bytearray | memoryview] = [envelope]
        for index, buffer in enumerate(buffers, start=1):
            frames.append(byte_view(buffer, index) if isinstance(buffer, memoryview) else buffer)
        self._send_counter += 1
        return frames

    def open(self, frames: Sequence[Buffer], parsed: Parsed | None = None) -> list[bytearray]:
        """Check the envelope; returns writable copies (frames may be read-only)."""
        self._abandon_assembly()
        self._check_envelope(frames, parsed)
        plaintexts = [bytearray(frame) for frame in frames[1:]]
        self._recv_counter += 1
        return plaintexts


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_REKEY_INTERVAL",
    "ENVELOPE_SIZE",
    "PlainSession",
    "Session",
]
