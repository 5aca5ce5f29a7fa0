"""SplitFed secure aggregation: pairwise masks that only the two clients of a pair can make.

After Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning"), without its secret-shared dropout recovery: a round needs every member.

* Each pair of clients (i, j) shares a static secret ``X25519(sk_i, pk_j)``: each client
  holds its own private key and the other members' *public* keys (``sl-pipeline init``
  writes them), so neither the server nor any third client can compute it.
* Every attempt at a round starts with each member sending a fresh random nonce; the server
  announces all of them. The round context hashes the round number and every member's
  nonce, so a client never uses the same mask twice, even if the server replays an old
  announcement, redoes a round, or the same keys are used for another run.
* The pair seed is ``HKDF-SHA256(shared, salt=context, info=label|a|b)``; the mask is the
  seed's ChaCha20 keystream read as little-endian uint64 words.
* A member adds the mask of each pair where it sorts first and subtracts it where it sorts
  second, over fixed-point integers mod 2^64: the masks cancel in the sum of all members'
  vectors and nothing else, so the server learns the sum and nothing more.

Everything here is pure: no sockets, no clock. :mod:`workers.client.group` and
:mod:`workers.server.engines.group` carry the bytes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, CryptoError, ProtocolError

FIXED_POINT_BITS = 24
NONCE_BYTES = 32
_CONTEXT_LABEL = b"sl-pipeline splitfed round v1"
_SEED_LABEL = b"sl-pipeline splitfed pair mask v1"
# |w| * 2^24 summed over the members must stay inside int64: weights up to 2^30 / members.
_MAX_ABS_WEIGHT = 2.0**30


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _field(data: bytes) -> bytes:
    """Length-prefixed, so no two different lists of fields hash alike."""
    return len(data).to_bytes(4, "big") + data


def round_context(round_: int, nonces: Mapping[str, bytes]) -> bytes:
    """What binds a pair's mask to this run and this attempt at this round."""
    h = hashlib.sha256(_field(_CONTEXT_LABEL) + round_.to_bytes(8, "big"))
    for name in sorted(nonces):
        h.update(_field(name.encode()) + _field(nonces[name]))
    return h.digest()


def pair_seed(own: X25519PrivateKey, peer_public: bytes, context: bytes, a: str, b: str) -> bytes:
    """The 32-byte seed of pair (a, b) for one round context; a < b by name."""
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point gives an all-zero secret; OpenSSL refuses it
        raise CryptoError(f"splitfed: the public key of {b if a < b else a} is unusable") from None
    info = _field(_SEED_LABEL) + _field(a.encode()) + _field(b.encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=info).derive(shared)


def mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint64 words of the seed's ChaCha20 keystream (a cryptographic generator)."""
    stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(stream.update(b"\x00" * (8 * size)), dtype="<u8").astype(np.uint64)


def to_fixed(vector: torch.Tensor) -> np.ndarray:
    """Weights as fixed-point integers mod 2^64 (two's complement in uint64)."""
    values = vector.detach().double().cpu().numpy()
    if not np.all(np.isfinite(values)) or np.abs(values).max(initial=0.0) > _MAX_ABS_WEIGHT:
        raise ConfigError("splitfed: the client segment's weights are not finite or too large")
    return np.round(values * 2**FIXED_POINT_BITS).astype(np.int64).view(np.uint64)


def average_from_sum(summed: torch.Tensor, parties: int) -> torch.Tensor:
    values = summed.numpy().astype(np.float64) / 2**FIXED_POINT_BITS / parties
    return torch.from_numpy(values).float()


@dataclass(frozen=True)
class MaskingKeys:
    """One client's view of the group: its own private key, the others' public keys."""

    me: str
    private: X25519PrivateKey = field(repr=False)
    peers: Mapping[str, bytes]  # every other member's name -> X25519 public key

    def __post_init__(self) -> None:
        if self.me in self.peers:
            raise ConfigError(f"splitfed: {self.me!r} is listed among its own peers")
        if not self.peers:
            raise ConfigError("splitfed: secure aggregation needs at least two clients")

    @property
    def members(self) -> list[str]:
        return sorted([self.me, *self.peers])

    def masked(self, vector: torch.Tensor, round_: int, nonces: Mapping[str, bytes]) -> np.ndarray:
        """This client's fixed-point weights plus its pairwise masks, as uint64 words."""
        if sorted(nonces) != self.members:
            raise ProtocolError(
                f"splitfed: the round's members {sorted(nonces)} are not the group {self.members}"
            )
        context = round_context(round_, nonces)
        out = to_fixed(vector).copy()
        for other, public in self.peers.items():
            a, b = sorted((self.me, other))
            words = mask(pair_seed(self.private, public, context, a, b), out.size)
            if self.me == a:
                out += words  # uint64 arithmetic wraps mod 2^64
            else:
                out -= words
        return out


def masked_tensor(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.view(np.int64).copy())


def sum_masked(vectors: list[np.ndarray]) -> np.ndarray:
    """The sum mod 2^64 of every member's masked words: the masks cancel exactly."""
    total = np.zeros_like(vectors[0])
    for words in vectors:
        total += words
    return total


__all__ = [
    "FIXED_POINT_BITS",
    "NONCE_BYTES",
    "MaskingKeys",
    "average_from_sum",
    "mask",
    "masked_tensor",
    "new_nonce",
    "pair_seed",
    "round_context",
    "sum_masked",
    "to_fixed",
]
