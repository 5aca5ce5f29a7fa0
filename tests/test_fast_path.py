"""The receive path copies a tensor once (the AEAD open writes it) and never again."""

from __future__ import annotations

import os

import torch

from sl_pipeline.messages import Kind, Message
from sl_pipeline.session import Session
from sl_pipeline.tensors import as_input
from sl_pipeline.transport import Channel


def _pair() -> tuple[Channel, Channel]:
    k1, k2 = os.urandom(32), os.urandom(32)
    a = Session(send_key=k1, recv_key=k2, remote_static=b"a", handshake_hash=b"h")
    b = Session(send_key=k2, recv_key=k1, remote_static=b"b", handshake_hash=b"h")
    return Channel(a), Channel(b)


def test_a_received_activation_is_used_where_it_was_decrypted() -> None:
    sender, receiver = _pair()
    act = torch.randn(32, 16, 4, 4)
    frames = sender.pack(Message(kind=Kind.FORWARD, tensors={"act": act}))
    received = receiver.unpack(frames).tensors["act"]
    leaf = as_input(received, requires_grad=True)
    assert leaf.data_ptr() == received.data_ptr()  # no second copy on the hot path
    assert leaf.requires_grad and not received.requires_grad
    assert torch.equal(leaf, act)


def test_half_precision_wire_tensors_are_widened_for_compute() -> None:
    sender, receiver = _pair()
    grad = torch.randn(8, 10)
    frames = sender.pack(Message(kind=Kind.BACKWARD, tensors={"grad": grad.half()}))
    leaf = as_input(receiver.unpack(frames).tensors["grad"], requires_grad=False)
    assert leaf.dtype == torch.float32
    assert torch.allclose(leaf, grad, atol=1e-2)
