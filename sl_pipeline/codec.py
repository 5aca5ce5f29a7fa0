"""Message <-> ZeroMQ frames. No pickle, no torch.load: a JSON header plus raw tensor bytes.

Frame 0 is a UTF-8 JSON header; frames 1..n are the tensors' contiguous bytes in the
order the header lists them. Every limit is checked against the header *before* any
buffer is interpreted, so a hostile peer cannot make us allocate.
See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from .errors import LimitError, ProtocolError, VersionError
from .limits import DEFAULT_LIMITS, Limits
from .messages import PROTOCOL_VERSION, Kind, Message

Buffer = bytes | bytearray | memoryview

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_KEYS = {"v", "kind", "re", "session", "client", "epoch", "step", "meta", "tensors"}
# Built once: ``json.dumps`` with ``separators`` builds a new encoder for every header.
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (one copy only if it is not contiguous).

    Straight through numpy's buffer: every torch reshape or view costs microseconds, and
    this runs for every tensor of every message."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.dtype is torch.bfloat16:  # numpy has no bfloat16; the bytes are the same
        flat = flat.view(torch.int16)
    array: Any = flat.numpy()
    return memoryview(array).cast("B")


def encode(message: Message) -> list[Buffer]:
    """Frames for ``message``: the JSON header then each tensor's raw bytes (no copies)."""
    specs: list[dict[str, Any]] = []
    buffers: list[Buffer] = []
    for name, tensor in message.tensors.items():
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        specs.append({"name": name, "dtype": dtype, "shape": list(tensor.shape)})
        buffers.append(tensor_bytes(tensor))
    header = {
        "v": PROTOCOL_VERSION,
        "kind": message.kind.value,
        "re": message.answers.value if message.answers is not None else None,
        "session": message.session,
        "client": message.client,
        "epoch": message.epoch,
        "step": message.step,
        "meta": _plain(message.meta),
        "tensors": specs,
    }
    return [_HEADER_ENCODER.encode(header).encode(), *buffers]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return value


def decode(frames: Sequence[Buffer], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse frames into a Message, raising ProtocolError (never anything else) if bad."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) > limits.max_frames:
        raise LimitError(f"message has {len(frames)} frames; the limit is {limits.max_frames}")
    header = _parse_header(frames[0], limits)
    specs = _check_specs(header["tensors"], len(frames) - 1, limits)
    tensors = {}
    for (name, dtype, shape, nbytes), frame in zip(specs, frames[1:], strict=True):
        if memoryview(frame).nbytes != nbytes:
            raise ProtocolError(
                f"tensor {name!r} frame has {memoryview(frame).nbytes} bytes; "
                f"dtype and shape say {nbytes}"
            )
        tensors[name] = _view(frame, dtype, shape)
    return Message(
        kind=header["kind"],
        session=header["session"],
        client=header["client"],
        epoch=header["epoch"],
        step=header["step"],
        meta=header["meta"],
        tensors=tensors,
        answers=header["re"],
    )


def _parse_header(frame: Buffer, limits: Limits) -> dict[str, Any]:
    size = memoryview(frame).nbytes
    if size > limits.max_header_bytes:
        raise LimitError(f"header is {size} bytes; the limit is {limits.max_header_bytes}")
    try:
        header = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError also covers integers of more than 4300 digits, RecursionError deep nesting
        raise ProtocolError(f"header is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise ProtocolError(
            f"header must be an object with exactly the keys {sorted(_HEADER_KEYS)}"
        )
    if header["v"] != PROTOCOL_VERSION:
        raise VersionError(
            f"peer speaks protocol version {header['v']!r}; this build speaks {PROTOCOL_VERSION}"
        )
    for key in ("kind", "re"):
        value = header[key]
        if key == "re" and value is None:  # a request answers nothing
            continue
        if not isinstance(value, str) or value not in Kind._value2member_map_:
            raise ProtocolError(f"header {key!r} names an unknown message kind {value!r}")
    if not isinstance(header["meta"], dict) or not isinstance(header["tensors"], list):
        raise ProtocolError("header 'meta' must be an object and 'tensors' a list")
    for key in ("session", "client"):
        if not isinstance(header[key], str):
            raise ProtocolError(f"header {key!r} must be a string")
    return header


def _check_specs(
    specs: list[Any], n_frames: int, limits: Limits
) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    if len(specs) != n_frames:
        raise ProtocolError(f"header lists {len(specs)} tensors but {n_frames} frames follow")
    checked = []
    total = 0
    for spec in specs:
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise ProtocolError("each tensor spec must be {name, dtype, shape}")
        name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or dtype_name not in DTYPES:
            raise ProtocolError(f"tensor spec has a bad name or dtype {dtype_name!r}")
        if not isinstance(shape, list) or len(shape) > limits.max_dims:
            raise LimitError(f"tensor {name!r} shape must be a list of at most {limits.max_dims}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ProtocolError(f"tensor {name!r} shape has a non-integer or negative dim")
        # An empty tensor passes the byte limit whatever its other dims; bound each dim too,
        # so no shape reaches torch that it cannot represent.
        if any(d > limits.max_tensor_bytes for d in shape):
            raise LimitError(
                f"tensor {name!r} has a dim over {limits.max_tensor_bytes} (max_tensor_bytes)"
            )
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > limits.max_tensor_bytes:
            raise LimitError(f"tensor {name!r} is {nbytes} bytes; limit {limits.max_tensor_bytes}")
        total += nbytes
        checked.append((name, dtype, tuple(shape), nbytes))
    if total > limits.max_message_bytes:
        raise LimitError(f"message carries {total} bytes; the limit is {limits.max_message_bytes}")
    return checked


def _view(frame: Buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Interpret the frame's bytes in place. The sessions hand us fresh writable buffers,
    which are used without a copy; a read-only buffer (a raw zmq frame) is copied once, so
    every decoded tensor is writable and its memory belongs to the message alone."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    view = memoryview(frame)
    if view.readonly:
        view = memoryview(bytearray(view))
    return torch.frombuffer(view, dtype=dtype).view(shape)
