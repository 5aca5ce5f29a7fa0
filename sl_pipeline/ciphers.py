"""Transport cipher suites: which AEAD seals a session's messages after the handshake.

Sans-IO. The Noise IK handshake itself is always ``Noise_IK_25519_AESGCM_SHA256`` (its
public test vectors hold); the client offers suites in its hello (``"ciphers"``, encrypted
and authenticated in Noise message 1), the server picks the first suite of its own list
that the client offered and names it in its welcome (``"cipher"``, authenticated in message
2), and both key that suite's AEAD with the Noise ``Split()`` keys. Neither choice can be
altered in transit: both payloads are covered by the handshake's tags.

Why a second suite: AES-256-GCM costs 3.4-3.6 GB/s on one core here, so a 2 MiB round
trip pays 2-3 ms of CPU for it; AES-128-OCB3 (RFC 7253, pyca/cryptography's public
``AESOCB3``) runs at 7-8 GB/s on the same core (``python -m bench.aead_options``;
docs/performance.md). A 128-bit key loses nothing against the handshake: X25519 gives about
128-bit security, so no session is stronger than that whichever AEAD seals it. OCB is not a
FIPS 140 mode: a site that needs one lists only ``aes256-gcm`` in ``server.ciphers``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from .errors import CipherError, ConfigError, CryptoError, ProtocolError

Buffer = bytes | bytearray | memoryview
CipherName = Literal["aes128-ocb3", "aes256-gcm"]
KEY_BYTES: Final = 32  # every suite is keyed from Noise's 32-byte keys
TAG_BYTES: Final = 16  # every suite's tag; the wire layout is the same for all
# The suites a peer offers or accepts when its config says nothing: fastest first.
DEFAULT_CIPHERS: Final[tuple[CipherName, ...]] = ("aes128-ocb3", "aes256-gcm")
# What a peer that names no suite (an older build) speaks.
LEGACY_CIPHER: Final = "aes256-gcm"
MAX_SHOWN: Final = 200  # characters of a refused offer that a refusal (and the log) repeats


class Aead(Protocol):
    """What a session needs of an AEAD (pyca/cryptography's AESGCM and AESOCB3 have it)."""

    def encrypt(self, nonce: Buffer, data: Buffer, associated_data: Buffer | None) -> bytes: ...

    def encrypt_into(
        self, nonce: Buffer, data: Buffer, associated_data: Buffer | None, buf: Buffer
    ) -> int: ...

    def decrypt_into(
        self, nonce: Buffer, data: Buffer, associated_data: Buffer | None, buf: Buffer
    ) -> int: ...


@dataclass(frozen=True)
class CipherSuite:
    """One transport AEAD: 12-byte nonces, 16-byte tags, keyed from a 32-byte Noise key."""

    name: CipherName
    key_bytes: int  # the first key_bytes of each 32-byte key
    make: Callable[[bytes], Aead]

    def aead(self, key: bytes) -> Aead:
        if len(key) != KEY_BYTES:
            raise CryptoError(f"a session key is {len(key)} bytes, not {KEY_BYTES}")
        return self.make(key[: self.key_bytes])


AES256_GCM: Final = CipherSuite("aes256-gcm", 32, AESGCM)
AES128_OCB3: Final = CipherSuite("aes128-ocb3", 16, AESOCB3)
SUITES: Final[dict[str, CipherSuite]] = {s.name: s for s in (AES128_OCB3, AES256_GCM)}


def check_names(names: Sequence[str]) -> tuple[CipherName, ...]:
    """A configured list, checked: at least one suite, each known."""
    if not names:
        raise ConfigError(f"ciphers is empty; list at least one of {list(SUITES)}")
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise ConfigError(f"cipher {unknown[0]!r} is unknown; choose from {list(SUITES)}")
    return tuple(SUITES[name].name for name in names)


def server_choice(offered: object, accepted: Sequence[str]) -> CipherSuite:
    """The server's pick from a hello's ``ciphers`` (absent: an older client's AES-GCM)."""
    if offered is None:
        offered = [LEGACY_CIPHER]
    if not isinstance(offered, list) or not all(isinstance(n, str) for n in offered):
        raise ProtocolError("the hello's 'ciphers' must be a list of suite names")
    for name in accepted:
        if name in offered:
            return SUITES[name]
    # Bounded after escaping: a name of control or astral characters grows up to 10-fold.
    shown = str([name[:32] for name in offered[:8]])
    shown = shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 4] + "...]"
    # The whole advice goes in the message: a refusal carries the message, not the hint.
    raise CipherError(
        f"no common cipher: the client offers {shown}, the server accepts {list(accepted)}; "
        "list a common suite in client.ciphers or server.ciphers (docs/security.md)"
    )


def client_check(chosen: object, offered: Sequence[str]) -> CipherSuite:
    """The suite a welcome names (absent: an older server's AES-GCM), if this client offered it."""
    if chosen is None:
        chosen = LEGACY_CIPHER
    if not isinstance(chosen, str) or chosen not in offered:
        shown = repr(chosen)[:40]
        raise CipherError(
            f"the server chose cipher {shown}, which this client did not offer ({list(offered)})",
            hint="a server may only pick a suite from the client's ciphers (docs/security.md)",
        )
    return SUITES[chosen]


__all__ = [
    "AES128_OCB3",
    "AES256_GCM",
    "DEFAULT_CIPHERS",
    "SUITES",
    "Aead",
    "CipherName",
    "CipherSuite",
    "check_names",
    "client_check",
    "server_choice",
]
