"""Sans-IO Noise IK handshake (``Noise_IK_25519_AESGCM_SHA256``, spec rev 34).

No I/O: callers feed bytes in and send what comes out. The handshake ends in a transport
session (:class:`~sl_pipeline.session.Session`, in ``session.py``), which seals a multipart
message as a 16-byte plaintext envelope ``magic(2) | version(1) | flags(1) | counter(8) |
frame_count(4)`` (big-endian) plus one ciphertext per buffer, under the transport suite the
peers agreed on (:mod:`sl_pipeline.ciphers`; the handshake itself is always AES-256-GCM as
the protocol name says); frame ``i`` >= 1
uses nonce ``i(4) || counter(8)`` and associated data ``envelope || i(4)``, so every byte,
the frame order and the frame count are authenticated. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sl_pipeline.ciphers import AES256_GCM, CipherSuite
from sl_pipeline.errors import ConfigError, CryptoError, LimitError, NotAdmittedError
from sl_pipeline.keys import KeyPair
from sl_pipeline.session import (
    _NONCE,
    DEFAULT_MAX_FRAMES,
    DEFAULT_REKEY_INTERVAL,
    ENVELOPE_SIZE,
    PlainSession,
    Session,
    _check_session_limits,
)

Buffer = bytes | bytearray | memoryview

PROTOCOL_NAME: Final = b"Noise_IK_25519_AESGCM_SHA256"
DEFAULT_PROLOGUE: Final = b"sl-pipeline/1"

_HASHLEN = 32
_DHLEN = 32
_TAGLEN = 16
# Noise caps every handshake message at 65535 bytes; the payload limits follow from it.
_MAX_NOISE_MESSAGE = 65535
_MSG1_OVERHEAD = _DHLEN + (_DHLEN + _TAGLEN) + _TAGLEN  # e, encrypted s, payload tag
_MSG2_OVERHEAD = _DHLEN + _TAGLEN  # e, payload tag
MAX_HANDSHAKE_PAYLOAD: Final = _MAX_NOISE_MESSAGE - _MSG1_OVERHEAD


# --- Noise primitives --------------------------------------------------------------------


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (spec section 4.3): HMAC-SHA256 extract, then 2 or 3 expand blocks."""
    if num_outputs not in (2, 3):
        raise ValueError("Noise HKDF produces 2 or 3 outputs")
    temp_key = _hmac(chaining_key, input_key_material)
    outputs: list[bytes] = []
    previous = b""
    for i in range(1, num_outputs + 1):
        previous = _hmac(temp_key, previous + bytes([i]))
        outputs.append(previous)
    return tuple(outputs)


def _generate_ephemeral() -> X25519PrivateKey:
    # A module-level seam so the known-answer test can inject the spec's fixed ephemerals.
    return X25519PrivateKey.generate()


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # low-order point: the shared secret would be all zeros
        raise CryptoError("peer sent an invalid X25519 public key; handshake aborted") from None


def _noise_nonce(n: int) -> bytes:
    return _NONCE.pack(0, n)


class _CipherState:
    """Noise CipherState for the handshake phase (nonce = 32 zero bits || 64-bit n)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = AESGCM(key) if key is not None else None
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        ciphertext = self._aead.encrypt(_noise_nonce(self.n), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        try:
            plaintext = self._aead.decrypt(_noise_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise CryptoError(
                "handshake message failed authentication",
                hint="check that the client pins the right server key and both use the same "
                "prologue (protocol version)",
            ) from None
        self.n += 1
        return plaintext


class _SymmetricState:
    """Noise SymmetricState: chaining key ``ck``, handshake hash ``h`` and a CipherState."""

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= _HASHLEN:
            self.h = protocol_name.ljust(_HASHLEN, b"\x00")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = _CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher = _CipherState(temp_k)  # HASHLEN == 32 == key size, no truncation

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return k1, k2


# --- Handshake -----------------------------------------------------------------------------


def _check_payload(payload: bytes) -> bytes:
    if len(payload) > MAX_HANDSHAKE_PAYLOAD:
        raise LimitError(
            f"handshake payload is {len(payload)} bytes, the limit is {MAX_HANDSHAKE_PAYLOAD}",
            hint="send large data after the handshake, over the session",
        )
    return bytes(payload)


def _check_message(message: Buffer, overhead: int, which: str) -> bytes:
    # Bound the size before any DH or hashing so junk costs the receiver nothing.
    size = memoryview(message).nbytes
    if not overhead <= size <= overhead + MAX_HANDSHAKE_PAYLOAD:
        raise CryptoError(
            f"{which} is {size} bytes; expected {overhead} to {overhead + MAX_HANDSHAKE_PAYLOAD}",
            hint="the peer is not speaking the sl-pipeline handshake",
        )
    return bytes(message)


class _Handshake:
    """State shared by both roles; a handshake object is single-use."""

    def __init__(
        self, static: KeyPair, prologue: bytes, rekey_interval: int, max_frames: int
    ) -> None:
        _check_session_limits(rekey_interval, max_frames)
        self._s = static
        self._sym = _SymmetricState(PROTOCOL_NAME)
        self._sym.mix_hash(bytes(prologue))
        self._step = "start"
        self._session_args = (rekey_interval, max_frames)

    def _advance(self, expected: str, method: str) -> None:
        if self._step != expected:
            raise CryptoError(
                f"{method}() is not valid now (handshake state: {self._step})",
                hint="use a new Initiator/Responder for every handshake attempt",
            )
        # Marked failed until the step completes: a half-mixed transcript must never be reused.
        self._step = "failed"

    def _session(
        self, send: bytes, recv: bytes, remote_static: bytes, cipher: CipherSuite
    ) -> Session:
        interval, max_frames = self._session_args
        return Session(
            send_key=send,
            recv_key=recv,
            remote_static=remote_static,
            handshake_hash=self._sym.h,
            rekey_interval=interval,
            max_frames=max_frames,
            cipher=cipher,
        )


class Initiator(_Handshake):
    """Client side of Noise IK: ``write_message1`` then ``read_message2``."""

    def __init__(
        self,
        static: KeyPair,
        remote_static: bytes,
        prologue: bytes = DEFAULT_PROLOGUE,
        *,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> None:
        super().__init__(static, prologue, rekey_interval, max_frames)
        if len(remote_static) != _DHLEN:
            raise ConfigError(f"server public key must be {_DHLEN} bytes, not {len(remote_static)}")
        self._rs = bytes(remote_static)
        self._sym.mix_hash(self._rs)  # pre-message "<- s"
        self._e: X25519PrivateKey | None = None

    def write_message1(self, payload: bytes) -> bytes:
        """``-> e, es, s, ss`` plus the encrypted payload."""
        payload = _check_payload(payload)
        self._advance("start", "write_message1")
        sym, e = self._sym, _generate_ephemeral()
        e_pub = _raw_public(e)
        sym.mix_hash(e_pub)
        sym.mix_key(_dh(e, self._rs))
        encrypted_s = sym.encrypt_and_hash(self._s.public)
        sym.mix_key(_dh(self._s.private, self._rs))
        encrypted_payload = sym.encrypt_and_hash(payload)
        self._e, self._step = e, "sent1"
        return e_pub + encrypted_s + encrypted_payload

    def read_message2(
        self, message: Buffer, cipher: Callable[[bytes], CipherSuite] | None = None
    ) -> tuple[bytes, Session]:
        """``<- e, ee, se``; returns the server's payload and the transport session.

        ``cipher`` reads the transport suite from the (authenticated) payload; without it
        the session uses AES-256-GCM, as Noise's own transport phase does."""
        self._advance("sent1", "read_message2")
        data = _check_message(message, _MSG2_OVERHEAD, "handshake reply")
        assert self._e is not None  # set by write_message1, which "sent1" implies
        sym, re = self._sym, data[:_DHLEN]
        sym.mix_hash(re)
        sym.mix_key(_dh(self._e, re))
        sym.mix_key(_dh(self._s.private, re))
        payload = sym.decrypt_and_hash(data[_DHLEN:])
        suite = AES256_GCM if cipher is None else cipher(payload)
        send, recv = sym.split()
        self._e, self._step = None, "done"
        return payload, self._session(send, recv, self._rs, suite)


class Responder(_Handshake):
    """Server side of Noise IK: ``read_message1`` then ``write_message2``."""

    def __init__(
        self,
        static: KeyPair,
        admitted: Callable[[bytes], bool],
        prologue: bytes = DEFAULT_PROLOGUE,
        *,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> None:
        super().__init__(static, prologue, rekey_interval, max_frames)
        self._admitted = admitted
        self._sym.mix_hash(static.public)  # pre-message "<- s"
        self._re = b""
        self._rs = b""

    def read_message1(self, message: Buffer) -> tuple[bytes, bytes]:
        """``-> e, es, s, ss``; returns ``(payload, client static key)``.

        Raises :class:`NotAdmittedError` for an authentic but unknown client key and
        :class:`CryptoError` for anything malformed or forged.
        """
        self._advance("start", "read_message1")
        data = _check_message(message, _MSG1_OVERHEAD, "handshake request")
        sym, re = self._sym, data[:_DHLEN]
        sym.mix_hash(re)
        sym.mix_key(_dh(self._s.private, re))
        rs = sym.decrypt_and_hash(data[_DHLEN : 2 * _DHLEN + _TAGLEN])
        sym.mix_key(_dh(self._s.private, rs))
        # The payload tag proves the sender holds rs's private key, so admission is decided
        # on an authenticated identity, never on a key someone merely copied.
        payload = sym.decrypt_and_hash(data[2 * _DHLEN + _TAGLEN :])
        if not self._admitted(rs):
            raise NotAdmittedError(
                "this client's key is not admitted",  # plaintext refusal: no fingerprint
                hint="add the client's .pub file to the server's admitted keys",
            )
        self._re, self._rs, self._step = re, rs, "read1"
        return payload, rs

    def write_message2(
        self, payload: bytes, cipher: CipherSuite = AES256_GCM
    ) -> tuple[bytes, Session]:
        """``<- e, ee, se`` plus the encrypted payload; returns the reply and the session
        (sealing with ``cipher``, which the payload should name to the client)."""
        payload = _check_payload(payload)
        self._advance("read1", "write_message2")
        sym, e = self._sym, _generate_ephemeral()
        e_pub = _raw_public(e)
        sym.mix_hash(e_pub)
        sym.mix_key(_dh(e, self._re))
        sym.mix_key(_dh(e, self._rs))
        encrypted_payload = sym.encrypt_and_hash(payload)
        initiator_to_responder, responder_to_initiator = sym.split()
        self._step = "done"
        session = self._session(responder_to_initiator, initiator_to_responder, self._rs, cipher)
        return e_pub + encrypted_payload, session


__all__ = [
    "DEFAULT_PROLOGUE",
    "DEFAULT_REKEY_INTERVAL",
    "ENVELOPE_SIZE",
    "MAX_HANDSHAKE_PAYLOAD",
    "PROTOCOL_NAME",
    "Initiator",
    "PlainSession",
    "Responder",
    "Session",
    "hkdf",
]
