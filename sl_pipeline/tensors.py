"""The wire's tensor rules: how a tensor is cast for the wire and read back from it.

``int8`` quantises symmetrically with one float32 scale per sample, ``float16`` and
``bfloat16`` halve the bytes, and whatever arrives is widened to a float32 leaf
(:func:`as_input`) before any model code sees it. Client, relay and server engines all
use these, so they are part of the protocol, not of one role.
"""

from __future__ import annotations

import torch

from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Message


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


def wire_tensors(name: str, tensor: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` as it goes on the wire. ``int8`` quantises symmetrically with one
    float32 scale per sample (``name + "_scale"``): 4x fewer bytes than float32."""
    if dtype != "int8":
        return {name: wire(tensor, dtype)}
    flat = tensor.detach().cpu().float().reshape(len(tensor), -1) if tensor.dim() else tensor
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    quantised = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {name: quantised.reshape(tensor.shape), f"{name}_scale": scale}


def read_tensor(msg: Message, name: str) -> torch.Tensor:
    """A tensor from a message as float32, dequantising int8 when a scale came with it."""
    tensor = msg.tensor(name)
    if tensor.dim() == 0:
        raise ProtocolError(f"{name} must have a batch dimension, got a 0-d tensor")
    if tensor.dtype != torch.int8:
        return tensor
    scale = msg.tensor(f"{name}_scale").to(torch.float32)
    if scale.shape != (len(tensor),):
        raise ProtocolError(f"{name}_scale must hold one scale per sample")
    flat = tensor.to(torch.float32).reshape(len(tensor), -1) * scale[:, None]
    return flat.reshape(tensor.shape)
