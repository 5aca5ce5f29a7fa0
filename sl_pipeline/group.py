"""Secrets shared by a group of clients and never by the server.

Round-robin hands a client segment's weights from one client to the next sealed with the
group key (AES-256-GCM, random 96-bit nonce, the round as associated data). SplitFed sends
weights as fixed-point integers plus pairwise masks derived from the group key: the masks
cancel in the server's sum mod 2^64, so the server learns the sum and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, CryptoError

FIXED_POINT_BITS = 24
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


def seal_weights(key: bytes, vector: torch.Tensor, round_: int) -> torch.Tensor:
    nonce = secrets.token_bytes(12)
    data = vector.detach().to(torch.float32).contiguous().numpy().tobytes()
    sealed = AESGCM(key).encrypt(nonce, data, f"round-{round_}".encode())
    return torch.frombuffer(bytearray(nonce + sealed), dtype=torch.uint8)


def open_weights(key: bytes, sealed: torch.Tensor, round_: int) -> torch.Tensor:
    blob = sealed.numpy().tobytes()
    try:
        data = AESGCM(key).decrypt(blob[:12], blob[12:], f"round-{round_}".encode())
    except (InvalidTag, ValueError):
        raise CryptoError("weights from the previous client failed authentication") from None
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


def _prg(key: bytes, label: str, size: int) -> np.ndarray:
    seed = hmac.new(key, label.encode(), hashlib.sha256).digest()
    gen = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return gen.integers(0, 2**64, size=size, dtype=np.uint64)


def masked_weights(
    key: bytes, vector: torch.Tensor, round_: int, me: str, group: Sequence[str]
) -> torch.Tensor:
    """Fixed-point weights plus masks that cancel when every member's vectors are summed."""
    if me not in group:
        raise ConfigError(f"client name {me!r} is not in client.group {list(group)}")
    fixed = np.round(vector.detach().double().numpy() * 2**FIXED_POINT_BITS).astype(np.int64)
    out = fixed.view(np.uint64).copy()
    for other in group:
        if other == me:
            continue
        a, b = sorted((me, other))
        mask = _prg(key, f"mask/{round_}/{a}/{b}", out.size)
        if me == a:
            out += mask
        else:
            out -= mask
    return torch.from_numpy(out.view(np.int64))


def average_from_sum(summed: torch.Tensor, parties: int) -> torch.Tensor:
    return torch.from_numpy(
        summed.numpy().astype(np.float64) / 2**FIXED_POINT_BITS / parties
    ).float()
