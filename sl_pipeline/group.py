"""The round-robin group key: a secret the clients share and the server never holds.

Round-robin hands a client segment's weights from one client to the next sealed with the
group key (AES-256-GCM, random 96-bit nonce). The associated data is the run id and the
turn the weights were sealed at; the receiving client computes both itself, so a server
that hands back an older blob, or one from an earlier run under the same key, is refused.
(SplitFed does not use a shared key: see :mod:`sl_pipeline.secagg`.)
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, CryptoError

if TYPE_CHECKING:  # torch is imported where weights are sealed, so `init` and `keygen` start fast
    import torch

_TAG = "sl-pipeline-group-key-v1"


def write_group_key(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{_TAG} {secrets.token_hex(32)}\n")


def load_group_key(path: Path) -> bytes:
    try:
        tag, value = path.read_text().split()
        key = bytes.fromhex(value)
    except (OSError, ValueError):
        raise ConfigError(
            f"client.group_key = {str(path)!r} is missing or not a group key"
        ) from None
    if tag != _TAG or len(key) != 32:
        raise ConfigError(f"client.group_key = {str(path)!r} is not a group key file")
    return key


def run_id(run_nonces: Mapping[str, str]) -> bytes:
    """The id of one run of a group: a hash of every member's fresh run nonce.

    Each client picks its nonce at the start of a run, so a run id is new for every run,
    even with the same group key, and no member can be left out of it unnoticed."""
    h = hashlib.sha256(b"sl-pipeline roundrobin run v1")
    for name in sorted(run_nonces):
        for part in (name.encode(), run_nonces[name].encode()):
            h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def _associated(run: bytes, turn: int) -> bytes:
    return b"sl-pipeline roundrobin v1|" + run + turn.to_bytes(8, "big")


def seal_weights(key: bytes, vector: torch.Tensor, run: bytes, turn: int) -> torch.Tensor:
    """Weights at the end of ``turn`` of run ``run``, for the next client only to open."""
    import torch

    nonce = secrets.token_bytes(12)
    data = vector.detach().to(torch.float32).contiguous().numpy().tobytes()
    sealed = AESGCM(key).encrypt(nonce, data, _associated(run, turn))
    return torch.frombuffer(bytearray(nonce + sealed), dtype=torch.uint8)


def open_weights(key: bytes, sealed: torch.Tensor, run: bytes, turn: int) -> torch.Tensor:
    """The weights sealed at the end of ``turn`` of this run; anything else is refused."""
    import torch

    if sealed.dtype != torch.uint8 or sealed.dim() != 1 or sealed.numel() < 28:
        raise CryptoError("roundrobin: the sealed weights are not a byte string")
    blob = sealed.numpy().tobytes()
    try:
        data = AESGCM(key).decrypt(blob[:12], blob[12:], _associated(run, turn))
    except (InvalidTag, ValueError):
        raise CryptoError(
            f"roundrobin: the weights the server handed over were not sealed at turn {turn} "
            "of this run (an older blob, another run's, or tampered); refusing them"
        ) from None
    return torch.frombuffer(bytearray(data), dtype=torch.float32)
