"""The wire's tensor rules: how a tensor is cast for the wire and read back from it.

``int8`` quantises symmetrically with one float32 scale per sample, ``int4`` and ``int2``
pack 2 or 4 stochastically rounded codes per byte (:func:`pack_codes`), ``float16`` and
``bfloat16`` halve the bytes, and whatever arrives is widened to a float32 leaf
(:func:`as_input`) before any model code sees it. Client, relay and server engines all
use these, so they are part of the protocol, not of one role.
"""

from __future__ import annotations

import math

import torch

from sl_pipeline import lowbit
from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Message

PACKED_BITS = {"int4": 4, "int2": 2}
_CONCAT_LIMIT = 1 << 20  # values: above it, copying them costs more than the calls saved
# ``int2-ef`` (sl_pipeline/lowbit.py): per tensor name, (blob mode, bits). Gradients go as
# signs with error feedback; any other name (outputs) as 8-bit codes.
EF_DTYPE = "int2-ef"
EF_SCHEME = {"act": (lowbit.AFFINE, 2), "grad": (lowbit.SIGN, 1)}
QUANTISED = frozenset({"int8", "int4", "int2", EF_DTYPE})
MAX_DIMS = 8


def as_input(
    tensor: torch.Tensor, requires_grad: bool, device: torch.device | None = None
) -> torch.Tensor:
    """A received tensor as a float32 leaf on ``device``, without a copy where none is
    needed: the codec gives every decoded tensor its own writable memory, and autograd
    never writes into a leaf's data. Half-precision wire tensors are widened; host-to-GPU
    copies go through pinned memory, asynchronously."""
    out = tensor.detach().to(torch.float32)
    if device is not None and device.type == "cuda":
        out = out.pin_memory().to(device, non_blocking=True)
    return out.requires_grad_(requires_grad)


def wire(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """Cast a tensor for the wire (optional fp16/bf16 compression)."""
    if dtype == "float16":
        return tensor.detach().to(torch.float16).cpu()
    if dtype == "bfloat16":
        return tensor.detach().to(torch.bfloat16).cpu()
    return tensor.detach().cpu()


def wire_tensors(
    name: str,
    tensor: torch.Tensor,
    dtype: str,
    residuals: lowbit.Residuals | None = None,
    peer: str = "",
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` as it goes on the wire. ``int8`` quantises symmetrically with one
    float32 scale per sample (``name + "_scale"``): 4x fewer bytes than float32. With
    ``int2-ef`` a gradient sent to ``peer`` carries that peer's error-feedback residual
    from ``residuals`` (the sender's; without it the signs go out uncorrected)."""
    if dtype == EF_DTYPE and tensor.dim() and tensor.numel():
        mode, bits = EF_SCHEME.get(name, (lowbit.AFFINE, 8))
        if mode == lowbit.SIGN and residuals is not None:
            return {name: residuals.sign(peer, tensor)}
        return {name: lowbit.encode(tensor, mode, bits)[0]}
    if dtype == EF_DTYPE:
        return {name: wire(tensor, "float32")}
    if dtype in PACKED_BITS and tensor.dim():
        return pack_codes(name, tensor, PACKED_BITS[dtype])
    if dtype != "int8":
        return {name: wire(tensor, dtype)}
    flat = tensor.detach().cpu().float().reshape(len(tensor), -1) if tensor.dim() else tensor
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    quantised = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {name: quantised.reshape(tensor.shape), f"{name}_scale": scale}


def wire_labels(labels: torch.Tensor, dtype: str) -> torch.Tensor:
    """Class labels for the wire: one byte each when compressing and they fit (the receiver
    widens them), else as they are."""
    if dtype in QUANTISED and len(labels) and 0 <= int(labels.min()) <= int(labels.max()) < 256:
        return labels.to(torch.uint8)
    return labels


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is a finite number (one sync for them all).
    Elementwise, not a norm or a sum: those overflow on large finite values."""
    return math.isfinite(largest_magnitude(tensors))


def largest_magnitude(tensors: list[torch.Tensor]) -> float:
    """The largest ``|x|`` over every floating-point value of ``tensors`` (0 for none):
    NaN if any value is NaN (``amax`` propagates it), infinite if any is infinite. One
    reduction and one sync answer both "all finite?" and "within ``max_abs``?", which
    run on every tensor received and on every step's weight gradients. Small tensors
    are reduced as one concatenation."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return 0.0
    if len(floats) == 1:
        return _extreme(floats[0])
    if sum(t.numel() for t in floats) <= _CONCAT_LIMIT:
        return _extreme(torch.cat([t.reshape(-1) for t in floats]))
    # float64, not float32: a finite float64 beyond float32's range must not read as infinite
    return float(torch.stack([t.abs().amax().double() for t in floats]).amax())


def _extreme(tensor: torch.Tensor) -> float:
    """``max |x|`` of one tensor from ``aminmax`` (one pass, no ``abs`` copy: about half
    the CPU of ``abs().amax()`` on a step's gradients); NaN if any value is NaN."""
    low, high = torch.aminmax(tensor)
    most, least = float(high), -float(low)
    return math.nan if math.isnan(most) or math.isnan(least) else max(most, least)


def read_tensor(
    msg: Message,
    name: str,
    max_batch: int | None = None,
    max_abs: float | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """A tensor from a message as float32, dequantising int8 when a scale came with it.
    NaN or infinite values are refused here, before any model code sees them: one peer's
    NaN activations would otherwise reach the optimizer and every other peer's model; so
    are values beyond ``max_abs`` in magnitude (``limits.max_abs_value``: finite but huge
    activations train the shared model into garbage just as well).
    ``max_batch`` refuses more samples than that, and ``sample_shape`` any other shape of
    one sample than that, before anything is decoded or computed."""
    raw = msg.tensor(name)
    if sample_shape is not None:
        check_sample_shape(msg, name, sample_shape)
    if lowbit.is_blob(raw):
        tensor = lowbit.decode(name, raw, max_batch)
    elif max_batch is not None and raw.dim() and len(raw) > max_batch:
        raise ProtocolError(
            f"{name} holds a batch of {len(raw)} samples; this worker takes at most "
            f"{max_batch} (server.max_batch or relay.max_batch): send smaller batches or "
            "raise the limit"
        )
    else:
        tensor = _decode(msg, name)
    largest = largest_magnitude([tensor])
    if not math.isfinite(largest):
        raise ProtocolError(
            f"{name} holds NaN or infinite values; the step was not applied "
            "(lower the learning rate or check the data if this comes from training)"
        )
    if max_abs is not None and largest > max_abs:
        raise ProtocolError(
            f"{name} holds a value of magnitude {largest:.3g}, beyond "
            f"limits.max_abs_value = {max_abs:g}; the step was not applied (a diverging "
            "run? lower train.lr; else raise the limit on the receiving worker if such "
            "values are expected)"
        )
    return tensor


def check_sample_shape(msg: Message, name: str, expected: tuple[int, ...]) -> None:
    """Refuse ``name`` unless one sample of it has shape ``expected``, from what the sender
    announces (the tensor's own shape, a packed tensor's ``name_shape`` or a blob's header),
    so a wrong-shaped tensor costs neither a decode nor a layer's compute."""
    got = announced_shape(msg, name)
    if tuple(got[1:]) != tuple(expected):
        raise ProtocolError(
            f"{name} has shape {list(got)}: one sample must be {list(expected)} here "
            "(model.in_shape and model.cuts); check that both sides use the same model config"
        )


def announced_shape(msg: Message, name: str) -> tuple[int, ...]:
    """The shape ``name`` will decode to, nothing decoded (malformed packing is refused
    later, by the decoder)."""
    raw = msg.tensor(name)
    if lowbit.is_blob(raw):
        return lowbit.announced_shape(name, raw)
    info = msg.tensors.get(f"{name}_shape")
    if raw.dtype != torch.uint8 or info is None or info.dtype != torch.int64:
        return tuple(raw.shape)
    if info.dim() == 1 and 2 <= len(info) <= MAX_DIMS + 1:
        return tuple(int(v) for v in info[1:])
    return tuple(raw.shape)


def _decode(msg: Message, name: str) -> torch.Tensor:
    tensor = msg.tensor(name)
    if tensor.dim() == 0:
        raise ProtocolError(f"{name} must have a batch dimension, got a 0-d tensor")
    if tensor.dtype == torch.uint8 and f"{name}_shape" in msg.tensors:
        return unpack_codes(msg, name)
    if tensor.dtype != torch.int8:
        if not tensor.is_floating_point():  # an int64 or bool "gradient" is no wire form
            raise ProtocolError(
                f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}: values travel "
                "as floats, as int8 with a scale or as packed codes"
            )
        return tensor
    scale = msg.tensor(f"{name}_scale").to(torch.float32)
    if scale.shape != (len(tensor),):
        raise ProtocolError(f"{name}_scale must hold one scale per sample")
    flat = tensor.to(torch.float32).reshape(len(tensor), -1) * scale[:, None]
    return flat.reshape(tensor.shape)


def pack_codes(name: str, tensor: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Each sample's values as ``bits``-bit codes over its own [min, max], rounded
    stochastically (so the dequantised value is unbiased), ``8 // bits`` codes per byte.
    With it travel ``name_range`` (float32 min and step per sample) and ``name_shape``
    (the bit width, then the original shape)."""
    flat = tensor.detach().cpu().float().reshape(len(tensor), -1)
    levels = 2**bits - 1
    low = flat.amin(dim=1, keepdim=True)
    step = ((flat.amax(dim=1, keepdim=True) - low) / levels).clamp_min(1e-30)
    scaled = (flat - low) / step
    codes = torch.floor(scaled + torch.rand_like(scaled)).clamp_(0, levels).to(torch.uint8)
    per_byte = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, (-codes.shape[1]) % per_byte))
    codes = codes.reshape(len(tensor), -1, per_byte)
    packed = codes[:, :, 0].clone()
    for i in range(1, per_byte):
        packed |= codes[:, :, i] << (bits * i)
    return {
        name: packed,
        f"{name}_range": torch.cat([low, step], dim=1),
        f"{name}_shape": torch.tensor([bits, *tensor.shape], dtype=torch.int64),
    }


def unpack_codes(msg: Message, name: str) -> torch.Tensor:
    """The float32 tensor :func:`pack_codes` sent, every size checked against the others."""
    packed, info = msg.tensor(name), msg.tensor(f"{name}_shape")
    value_range = msg.tensor(f"{name}_range")
    if info.dtype != torch.int64 or info.dim() != 1 or not 2 <= len(info) <= MAX_DIMS + 1:
        raise ProtocolError(f"{name}_shape must be int64 [bits, *shape]")
    bits, *shape = (int(v) for v in info)
    batch = len(packed)
    if bits not in PACKED_BITS.values() or packed.dim() != 2 or min(shape) < 0:
        raise ProtocolError(f"{name} must be a [batch, bytes] uint8 tensor of 2- or 4-bit codes")
    per_byte, count = 8 // bits, math.prod(shape[1:])
    if shape[0] != batch or packed.shape[1] != -(-count // per_byte):
        raise ProtocolError(f"{name} holds {tuple(packed.shape)} bytes, not shape {shape}")
    if value_range.dtype != torch.float32 or tuple(value_range.shape) != (batch, 2):
        raise ProtocolError(f"{name}_range must be float32 [batch, 2] (min, step)")
    # Codes widen 16x (int2) or 8x (int4) into float32: bound the result, not the bytes
    # sent, before anything is allocated (the same bound lowbit blobs have).
    if batch * count * 4 > lowbit.MAX_DECODED_BYTES:
        raise ProtocolError(
            f"{name} announces shape {shape}: {batch * count * 4} bytes once decoded, over "
            f"{lowbit.MAX_DECODED_BYTES}; send smaller batches"
        )
    values = lowbit.unpack_rows(packed, bits, count)  # in place from here: one float32 copy
    return values.mul_(value_range[:, 1:]).add_(value_range[:, :1]).reshape(shape)
