"""Private set intersection of two vertical parties' ids (ECDH-PSI, OpenMined's library).

Both parties run the same two rounds, each acting as PSI client and as PSI server for the
other, so each computes the intersection itself and neither has to trust a list it is told:

* round 0: each sends its *setup* (its own ids hashed to P-256 and raised to its secret key)
  and its *request* (its ids raised to a second secret key);
* round 1: each answers the other's request (raises those points to its key) and sends the
  answer back; with the other's setup and the answer to its own request, each finds which of
  its ids the other also holds, and nothing about the others (DDH).

The group arithmetic, hashing to the curve and the encodings are OpenMined's
(``openmined.psi``, built on Google's private-join-and-compute); nothing here is home-made
but the framing. Every payload is sealed with the clients' group key (AES-256-GCM, sender,
receiver and round bound as associated data) before it travels, so the server that relays it
learns neither blinded points nor the intersection: it sees ciphertext lengths (the set
sizes) only. Pure code over bytes: :mod:`workers.client.align` carries the payloads.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence

import private_set_intersection.python as openmined_psi
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, CryptoError, ProtocolError

FALSE_POSITIVE_RATE = 1e-12  # RAW sets compare exactly; the rate only sizes filters
_LABEL = "sl-pipeline-psi-v1"


def seal(key: bytes, payload: bytes, sender: str, receiver: str, round_: int) -> bytes:
    nonce = secrets.token_bytes(12)
    aad = f"{_LABEL}/{round_}/{sender}/{receiver}".encode()
    return nonce + AESGCM(key).encrypt(nonce, payload, aad)


def unseal(key: bytes, blob: bytes, sender: str, receiver: str, round_: int) -> bytes:
    aad = f"{_LABEL}/{round_}/{sender}/{receiver}".encode()
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise CryptoError(
            f"PSI round {round_} from {sender!r} failed authentication; "
            "both parties need the same client.group_key"
        ) from None


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _unpack(blob: bytes, count: int) -> list[bytes]:
    parts, at = [], 0
    for _ in range(count):
        if at + 4 > len(blob):
            raise ProtocolError("PSI payload is truncated")
        (size,) = struct.unpack_from(">I", blob, at)
        parts.append(blob[at + 4 : at + 4 + size])
        at += 4 + size
    if at != len(blob) or any(len(p) == 0 for p in parts):
        raise ProtocolError("PSI payload has the wrong framing")
    return parts


class PsiParty:
    """One party's side of the two rounds; ``ids`` are text and must be unique."""

    def __init__(self, ids: Sequence[str], key: bytes, me: str, other: str) -> None:
        if me == other:
            raise ConfigError(f"PSI needs two differently named parties, got {me!r} twice")
        self.ids = list(ids)
        self.key, self.me, self.other = key, me, other
        self._client = openmined_psi.client.CreateWithNewKey(True)  # reveal the intersection
        self._server = openmined_psi.server.CreateWithNewKey(True)
        self._their_setup: object | None = None

    def first(self) -> bytes:
        """Round 0: my setup and my request, sealed for the other party."""
        setup = self._server.CreateSetupMessage(
            FALSE_POSITIVE_RATE, len(self.ids), self.ids, openmined_psi.DataStructure.RAW
        )
        request = self._client.CreateRequest(self.ids)
        payload = _pack(setup.SerializeToString(), request.SerializeToString())
        return seal(self.key, payload, self.me, self.other, 0)

    def second(self, sealed: bytes) -> bytes:
        """Round 1: the answer to the other's request, sealed for it."""
        setup_bytes, request_bytes = _unpack(unseal(self.key, sealed, self.other, self.me, 0), 2)
        try:
            setup = openmined_psi.ServerSetup()
            setup.ParseFromString(setup_bytes)
            request = openmined_psi.Request()
            request.ParseFromString(request_bytes)
            response = self._server.ProcessRequest(request)
        except Exception as exc:  # the library raises plain RuntimeError/DecodeError
            raise ProtocolError(f"PSI round 0 from {self.other!r} is malformed: {exc}") from None
        self._their_setup = setup
        return seal(self.key, _pack(response.SerializeToString()), self.me, self.other, 1)

    def result(self, sealed: bytes) -> list[int]:
        """My rows in the intersection, ordered by id (text order): both parties agree."""
        if self._their_setup is None:
            raise ProtocolError("PSI round 1 arrived before round 0")
        (response_bytes,) = _unpack(unseal(self.key, sealed, self.other, self.me, 1), 1)
        try:
            response = openmined_psi.Response()
            response.ParseFromString(response_bytes)
            rows = self._client.GetIntersection(self._their_setup, response)
        except Exception as exc:
            raise ProtocolError(f"PSI round 1 from {self.other!r} is malformed: {exc}") from None
        return sorted((int(r) for r in rows), key=lambda r: self.ids[r])
