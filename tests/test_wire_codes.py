"""``int4`` / ``int2`` wire dtypes: packed stochastic codes, read back unbiased, and every
malformed part of them refused as a protocol error (a peer chooses these tensors)."""

from __future__ import annotations

import pytest
import torch

from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.tensors import read_tensor, wire_tensors


def _round_trip(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return read_tensor(
        Message(kind=Kind.FORWARD, tensors=wire_tensors("act", tensor, dtype)), "act"
    )


@pytest.mark.parametrize(("dtype", "per_byte"), [("int4", 2), ("int2", 4)])
def test_codes_are_packed_and_read_back_within_one_step(dtype: str, per_byte: int) -> None:
    # Prepare
    torch.manual_seed(0)
    act = torch.randn(8, 3, 5, 5)  # 75 values per sample: the last byte is padded

    # Execute
    wired = wire_tensors("act", act, dtype)
    back = _round_trip(act, dtype)

    # Assert: 8 / bits codes per byte, and every value within one quantisation step
    assert wired["act"].dtype == torch.uint8
    assert tuple(wired["act"].shape) == (8, -(-75 // per_byte))
    step = wired["act_range"][:, 1].reshape(8, 1, 1, 1)
    assert back.shape == act.shape and bool(((back - act).abs() <= step * 1.0001).all())


def test_stochastic_rounding_is_unbiased() -> None:
    torch.manual_seed(1)
    grad = torch.randn(4, 64) * 1e-4  # cut-layer gradients are small
    mean = sum(_round_trip(grad, "int2") for _ in range(400)) / 400
    step = (grad.amax(dim=1) - grad.amin(dim=1)).max() / 3
    assert float((mean - grad).abs().max()) < 0.2 * float(step)


@pytest.mark.parametrize(
    ("tensor", "value", "match"),
    [
        ("act_shape", torch.tensor([3, 8, 75]), "uint8 tensor of 2- or 4-bit codes"),
        ("act_shape", torch.tensor([4, 9, 75]), "not shape"),
        ("act_shape", torch.tensor([4, 8, 80]), "not shape"),
        ("act_shape", torch.tensor([4.0, 8.0, 75.0]), "int64"),
        ("act_range", torch.zeros(8, 3), "float32 \\[batch, 2\\]"),
        ("act", torch.zeros(8, 37, dtype=torch.uint8), "not shape"),
    ],
)
def test_malformed_codes_are_refused(tensor: str, value: torch.Tensor, match: str) -> None:
    tensors = wire_tensors("act", torch.randn(8, 75), "int4")
    tensors[tensor] = value
    with pytest.raises(ProtocolError, match=match):
        read_tensor(Message(kind=Kind.FORWARD, tensors=tensors), "act")
