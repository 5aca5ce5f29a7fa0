"""Low-bit wire tensors in one self-describing blob, and error feedback for gradients.

``train.wire_dtype = "int2-ef"`` sends activations as 2-bit codes (nearest rounding over each
sample's [min, max]), gradients as 1 bit per value (the sign, times the sample's mean
magnitude) with *error feedback*, and outputs as 8-bit codes. Error feedback: the sender
keeps what the 1-bit code lost (``residual = gradient - sent``) and adds it to the next
gradient it sends the same peer, so nothing is lost for good, only delayed (EF-SignSGD,
Karimireddy et al. 2019). Each tensor is one uint8 frame, so the message header lists one
tensor, not three:

``b"SLQ" | version(1) | mode(1) | bits(1) | ndim(1) | ndim x dim (uint32, big-endian) |
batch x params (float32, little-endian) | batch x row (codes)``

mode 1 (affine): params ``(low, step)``, value = low + code * step; mode 2 (sign, 1 bit):
params ``scale``, value = +scale for code 1 and -scale for code 0. Each sample's codes fill
``ceil(values * bits / 8)`` bytes, code ``i`` in bits ``(i % (8 / bits)) * bits`` of byte
``i // (8 / bits)``. See docs/protocol.md ("Compressed tensors"). Pure code, no I/O.
"""

from __future__ import annotations

import math
import struct
from typing import Final

import torch

from sl_pipeline.errors import ProtocolError

MAGIC: Final = b"SLQ"
VERSION: Final = 1
AFFINE: Final = 1
SIGN: Final = 2
MAX_DIMS: Final = 8
# A blob decodes to up to 32x its size (1-bit codes into float32): bound what it may announce.
MAX_DECODED_BYTES: Final = 256 * 1024 * 1024
DEFAULT_RESIDUAL_BYTES: Final = 256 * 1024 * 1024
_HEAD = struct.Struct(">3sBBBB")
_AFFINE_BITS = (1, 2, 4, 8)
_PARAMS = {AFFINE: 2, SIGN: 1}  # float32 parameters per sample


def is_blob(tensor: torch.Tensor) -> bool:
    """Whether a received tensor claims to be a blob (every 1-D uint8 wire tensor does)."""
    return tensor.dtype == torch.uint8 and tensor.dim() == 1


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[batch, values]`` codes (< 2**bits) as ``[batch, ceil(values * bits / 8)]`` bytes."""
    per_byte = 8 // bits
    codes = codes.to(torch.int32)
    codes = torch.nn.functional.pad(codes, (0, (-codes.shape[1]) % per_byte))
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    grouped = codes.reshape(len(codes), -1, per_byte) << shifts
    return grouped.sum(dim=2).to(torch.uint8)


def unpack_rows(rows: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``[batch, bytes]`` packed codes as ``[batch, count]`` float32 codes (not yet scaled)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (rows.unsqueeze(2) >> shifts) & (2**bits - 1)
    return codes.reshape(len(rows), -1)[:, :count].to(torch.float32)


def encode(tensor: torch.Tensor, mode: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blob, what the receiver will read)`` for a tensor with a batch dimension."""
    flat = tensor.detach().cpu().to(torch.float32).reshape(len(tensor), -1)
    if mode == SIGN:
        scale = flat.abs().mean(dim=1, keepdim=True)
        codes = flat >= 0
        params = scale
        sent = torch.where(codes, scale, -scale)
    else:
        levels = 2**bits - 1
        low = flat.amin(dim=1, keepdim=True)
        step = ((flat.amax(dim=1, keepdim=True) - low) / levels).clamp_min(1e-30)
        codes = torch.round((flat - low) / step).clamp_(0, levels)
        params = torch.cat([low, step], dim=1)
        sent = low + codes * step
    shape = tuple(tensor.shape)
    head = _HEAD.pack(MAGIC, VERSION, mode, bits, len(shape)) + struct.pack(
        f">{len(shape)}I", *shape
    )
    blob = torch.cat(
        [
            torch.frombuffer(bytearray(head), dtype=torch.uint8),
            params.contiguous().view(torch.uint8).reshape(-1),
            _pack_rows(codes, bits).reshape(-1),
        ]
    )
    return blob, sent.reshape(shape)


def announced_shape(name: str, blob: torch.Tensor) -> tuple[int, ...]:
    """The shape a blob says it carries, read from its header alone (nothing decoded)."""
    return _header(name, blob)[2]


def _header(name: str, blob: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    head = blob[: _HEAD.size + 4 * MAX_DIMS].numpy().tobytes()
    if len(head) < _HEAD.size:
        raise ProtocolError(f"{name} is a {len(head)}-byte uint8 tensor, too short for a blob")
    magic, version, mode, bits, ndim = _HEAD.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"{name} is a 1-D uint8 tensor but not a v{VERSION} blob")
    if mode not in _PARAMS or bits not in _AFFINE_BITS or (mode == SIGN and bits != 1):
        raise ProtocolError(f"{name}: blob mode {mode} with {bits} bits is not defined")
    if not 1 <= ndim <= MAX_DIMS or len(head) < _HEAD.size + 4 * ndim:
        raise ProtocolError(f"{name}: blob of {ndim} dims is malformed")
    return mode, bits, struct.unpack_from(f">{ndim}I", head, _HEAD.size)


def decode(name: str, blob: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """The float32 tensor a blob carries; every size is checked before anything is decoded,
    so a peer cannot make us allocate more than the blob's announced, bounded shape."""
    mode, bits, shape = _header(name, blob)
    ndim, batch, count = len(shape), shape[0], math.prod(shape[1:])
    if batch < 1:
        raise ProtocolError(f"{name}: blob of shape {shape} holds no sample")
    if max_batch is not None and batch > max_batch:
        raise ProtocolError(
            f"{name} holds a batch of {batch} samples; this worker takes at most "
            f"{max_batch} (server.max_batch or relay.max_batch): send smaller batches or "
            "raise the limit"
        )
    if batch * count * 4 > MAX_DECODED_BYTES:
        raise ProtocolError(f"{name}: blob announces shape {shape}, over {MAX_DECODED_BYTES} bytes")
    start = _HEAD.size + 4 * ndim
    row = -(-count * bits // 8)
    params = _PARAMS[mode]
    expected = start + batch * (4 * params + row)
    if blob.numel() != expected:
        raise ProtocolError(
            f"{name}: blob is {blob.numel()} bytes; its shape {shape} needs {expected}"
        )
    values = blob[start : start + batch * 4 * params].clone().view(torch.float32)
    values = values.reshape(batch, params)
    rows = blob[start + batch * 4 * params :].reshape(batch, row)
    codes = unpack_rows(rows, bits, count)
    out = (codes * 2 - 1) * values if mode == SIGN else values[:, :1] + codes * values[:, 1:]
    return out.reshape(shape)


class Residuals:
    """Error feedback: per peer, what the last 1-bit gradient did not carry. Bounded: over
    ``max_bytes`` the oldest peers' residuals are dropped (they restart from zero)."""

    def __init__(self, max_bytes: int = DEFAULT_RESIDUAL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._held: dict[str, torch.Tensor] = {}

    def sign(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """The 1-bit blob for ``grad`` plus this peer's residual; keeps the new residual."""
        corrected = grad.detach().cpu().to(torch.float32)
        residual = self._held.pop(key, None)
        if residual is not None and residual.shape == corrected.shape:
            corrected = corrected + residual
        blob, sent = encode(corrected, SIGN, 1)
        left = corrected - sent
        if bool(torch.isfinite(left).all()):  # a non-finite residual would spoil every step
            self._held[key] = left
            self._evict()
        return blob

    def forget(self, key: str) -> None:
        self._held.pop(key, None)

    def __len__(self) -> int:
        return len(self._held)

    def _evict(self) -> None:
        total = sum(t.numel() * 4 for t in self._held.values())
        for key in list(self._held):
            if total <= self.max_bytes:
                break
            total -= self._held.pop(key).numel() * 4
