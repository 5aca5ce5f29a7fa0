"""Where a defense's noise comes from: the operating system's cryptographic generator in
production, a seeded torch generator only when an audit or a test passes one.

Never torch's global generator: every worker seeds it with ``model.seed`` to build identical
initial weights, and a peer knows that seed (the handshake checks that the ``[model]``
sections match), so noise drawn from it can be replayed and subtracted.

Nor a secretly seeded torch generator: torch's CPU generator is Mersenne Twister, whose state
follows linearly from its outputs. After a ReLU most cut-layer coordinates are exactly zero, so
a release shows the server raw noise draws there; a red team recovered the generator's uniforms
from them bit for bit (20 of 24 bits for 99 % of draws), enough in principle to solve for the
state and subtract every later draw. Production noise is therefore Box-Muller (or inverse-CDF)
on uniforms taken from the operating system's cryptographic generator (``secrets``,
getrandom(2) on Linux): nothing a peer sees predicts another draw. Nor may a secret seed stand
in for it: torch's CPU generator keeps only the low 32 bits of any seed, a space a peer can
search (DP-SGD's Poisson sampling draws from the OS too: :mod:`privacy.dpsgd`).

Activation noise is *keyed* (:func:`keyed_normal`): each row's draws are a function of a secret
key, drawn from the OS once per client, and of that row's exact bytes. A row computed again
through the same weights (a step redone after a server's rewind, which a malicious server can
ask for at will; a prediction asked again) is released again bit for bit, so averaging its
repeats takes no noise away; anything else about the row (another encoder, another row) draws
independent noise. Fresh draws per release let a server that forces K redos of a step divide
the noise's variance on its rows by K + 1.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping

import numpy as np
import torch

_MANTISSA_BITS = 53


def secret_uniform(count: int) -> torch.Tensor:
    """``count`` float64 uniforms in the open interval (0, 1) from the OS's secret randomness."""
    words = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64) >> np.uint64(
        64 - _MANTISSA_BITS
    )
    # (k + 0.5) / 2**53: never 0 or 1, so the logarithms below stay finite
    return torch.from_numpy((words.astype(np.float64) + 0.5) * 2.0**-_MANTISSA_BITS)


def secret_normal(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Standard normal float64 draws of ``shape`` (Box-Muller on secret uniforms)."""
    count = math.prod(shape)
    u = secret_uniform(2 * ((count + 1) // 2)).reshape(2, -1)
    radius = torch.sqrt(-2.0 * torch.log(u[0]))
    angle = 2.0 * math.pi * u[1]
    return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count].reshape(shape)


def secret_exponential(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Exponential(1) float64 draws of ``shape`` (inverse CDF on secret uniforms)."""
    return -torch.log(secret_uniform(math.prod(shape))).reshape(shape)


def keyed_uniform(key: bytes, rows: torch.Tensor, count: int) -> torch.Tensor:
    """``(len(rows), count)`` float64 uniforms in (0, 1): row i's are SHAKE-256 output seeded
    with a BLAKE2b MAC, under the secret ``key``, of row i's exact bytes (and dtype)."""
    flat = rows.detach().reshape(rows.shape[0], -1).contiguous().cpu()
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros((len(flat), 0), np.uint8)
    tag = str(flat.dtype).encode()
    words = np.empty((len(raw), count), dtype=np.uint64)
    for i, row in enumerate(raw):
        seed = hashlib.blake2b(tag + row.tobytes(), key=key, digest_size=32).digest()
        words[i] = np.frombuffer(hashlib.shake_256(seed).digest(8 * count), dtype=np.uint64)
    words >>= np.uint64(64 - _MANTISSA_BITS)
    return torch.from_numpy((words.astype(np.float64) + 0.5) * 2.0**-_MANTISSA_BITS)


def keyed_normal(key: bytes, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Standard normal float64 draws shaped like ``rows`` (or ``(len(rows), width)``), each
    row's a function of ``key`` and that row's exact bytes (Box-Muller on
    :func:`keyed_uniform`)."""
    count = math.prod(rows.shape[1:]) if width is None else width
    half = (count + 1) // 2
    u = keyed_uniform(key, rows, 2 * half)
    radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    angle = 2.0 * math.pi * u[:, half:]
    both = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)[:, :count]
    return both.reshape(rows.shape) if width is None else both


def keyed_exponential(key: bytes, rows: torch.Tensor, draws: int) -> torch.Tensor:
    """``draws`` Exponential(1) float64 tensors shaped like ``rows``, stacked on a first
    dimension; each row's a function of ``key`` and that row's exact bytes."""
    width = math.prod(rows.shape[1:])
    u = keyed_uniform(key, rows, draws * width).reshape(len(rows), draws, width)
    return -torch.log(u).transpose(0, 1).reshape(draws, *rows.shape)


class SecretRandomness:
    """Mixin: draws from ``self.generator`` when an audit or test gave one, else from the
    operating system's cryptographic generator (above)."""

    generator: torch.Generator | None
    _key: bytes | None = None

    @property
    def key(self) -> bytes:
        """This instance's secret key for keyed draws (drawn from the OS at first use)."""
        if self._key is None:
            self._key = secrets.token_bytes(32)
        return self._key

    def normal(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.generator is not None:
            return torch.randn(shape, generator=self.generator, dtype=dtype, device=device)
        return secret_normal(shape).to(dtype=dtype, device=device)

    def exponential(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is not None:
            return torch.empty_like(like).exponential_(generator=self.generator)
        return secret_exponential(like.shape).to(dtype=like.dtype, device=like.device)


def export_keys(parts: Mapping[str, object]) -> dict[str, str]:
    """The keys of those ``parts`` that draw keyed noise, in hex, for a checkpoint: a client
    restarted from it releases a row computed again bit for bit as before (a relay that lost
    the step takes the same request; an observer of both releases can average nothing),
    where a key drawn afresh at the restart would release it with new noise."""
    return {
        name: part.key.hex()
        for name, part in parts.items()
        if isinstance(part, SecretRandomness) and part.generator is None
    }


def import_keys(parts: Mapping[str, object], keys: Mapping[str, str] | None) -> None:
    """Give ``parts`` back the keys :func:`export_keys` took (a checkpoint without them, from
    an older version, leaves the keys drawn at this start)."""
    for name, value in (keys or {}).items():
        part = parts.get(name)
        if isinstance(part, SecretRandomness) and part.generator is None:
            part._key = bytes.fromhex(value)


__all__ = [
    "SecretRandomness",
    "export_keys",
    "import_keys",
    "keyed_exponential",
    "keyed_normal",
    "keyed_uniform",
    "secret_exponential",
    "secret_normal",
    "secret_uniform",
]
