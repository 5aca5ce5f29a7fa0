"""``int2-ef``: low-bit blobs read back within one step, signs with error feedback lose
nothing for good, and every malformed blob is refused as a protocol error (a peer sends it)."""

from __future__ import annotations

import asyncio
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sl_pipeline import lowbit
from sl_pipeline.codec import decode, encode
from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.tensors import read_tensor, wire_labels, wire_tensors
from workers.cli import main
from workers.tools.inprocess import run_deployment

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4)


def _over_wire(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Through the real codec, as a peer receives it."""
    frames = encode(Message(kind=Kind.FORWARD, tensors=tensors))
    return read_tensor(decode([bytes(f) for f in frames]), name)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16))
def test_affine_codes_read_back_within_half_a_step(shape: list[int], bits: int, seed: int) -> None:
    torch.manual_seed(seed)
    tensor = torch.randn(shape) * 3
    blob, sent = lowbit.encode(tensor, lowbit.AFFINE, bits)
    back = _over_wire({"act": blob}, "act")
    flat = tensor.reshape(len(tensor), -1)
    step = (flat.amax(1) - flat.amin(1)) / (2**bits - 1)
    error = (back - tensor).reshape(len(tensor), -1).abs().amax(1)
    assert back.shape == tensor.shape and torch.equal(back, sent)
    assert bool((error <= step / 2 * 1.0001 + 1e-6).all())


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_signs_carry_the_sign_and_the_mean_magnitude(shape: list[int], seed: int) -> None:
    torch.manual_seed(seed)
    grad = torch.randn(shape)
    back = _over_wire({"grad": lowbit.encode(grad, lowbit.SIGN, 1)[0]}, "grad")
    flat, sent = grad.reshape(len(grad), -1), back.reshape(len(grad), -1)
    assert torch.equal(sent >= 0, flat >= 0)
    assert torch.allclose(sent.abs(), flat.abs().mean(1, keepdim=True).expand_as(sent))


def test_error_feedback_delivers_the_sum_of_gradients() -> None:
    # The sum of what was sent differs from the sum of the true gradients only by the last
    # residual: error feedback delays what a 1-bit code drops, it never loses it.
    torch.manual_seed(3)
    residuals = lowbit.Residuals()
    grads = [torch.randn(8, 20) * 1e-3 for _ in range(50)]
    sent = [_over_wire(wire_tensors("grad", g, "int2-ef", residuals, "c1"), "grad") for g in grads]
    owed = torch.stack(grads).sum(0) - torch.stack(sent).sum(0)  # the last residual only
    without = torch.stack([lowbit.encode(g, lowbit.SIGN, 1)[1] for g in grads]).sum(0)
    assert len(residuals) == 1
    assert float(owed.abs().max()) < 4 * float(grads[0].abs().max())
    assert float((torch.stack(grads).sum(0) - without).norm()) > 3 * float(owed.norm())


def test_residuals_are_kept_per_peer_and_bounded() -> None:
    residuals = lowbit.Residuals(max_bytes=3 * 8 * 20 * 4)
    for peer in ("a", "b", "c", "d"):
        wire_tensors("grad", torch.randn(8, 20), "int2-ef", residuals, peer)
    assert len(residuals) == 3  # the oldest peer's residual was dropped
    wire_tensors("grad", torch.full((8, 20), float("nan")), "int2-ef", residuals, "b")
    assert len(residuals) == 2  # a non-finite gradient leaves no residual behind


def test_the_scheme_by_name_and_its_fallbacks() -> None:
    act = wire_tensors("act", torch.randn(4, 10), "int2-ef")["act"]
    out = wire_tensors("out", torch.randn(4, 10), "int2-ef")["out"]
    empty = wire_tensors("out", torch.randn(4, 0), "int2-ef")["out"]
    assert (act[4], act[5]) == (lowbit.AFFINE, 2) and (out[4], out[5]) == (lowbit.AFFINE, 8)
    assert empty.dtype == torch.float32 and empty.shape == (4, 0)
    assert wire_labels(torch.tensor([0, 9, 3]), "int2-ef").dtype == torch.uint8
    assert wire_labels(torch.tensor([0, 300]), "int2-ef").dtype == torch.int64
    assert wire_labels(torch.tensor([0, 9]), "float32").dtype == torch.int64


def _blob(head: bytes, body: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(head + bytes(body)), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (_blob(b"SL", 0), "too short"),
        (_blob(b"XYZ\x01\x01\x02\x01" + struct.pack(">I", 4), 40), "not a v1 blob"),
        (_blob(b"SLQ\x01\x03\x02\x01" + struct.pack(">I", 4), 40), "mode 3"),
        (_blob(b"SLQ\x01\x02\x02\x01" + struct.pack(">I", 4), 40), "mode 2 with 2 bits"),
        (_blob(b"SLQ\x01\x01\x03\x01" + struct.pack(">I", 4), 40), "mode 1 with 3 bits"),
        (_blob(b"SLQ\x01\x01\x02\x09", 40), "9 dims"),
        (
            _blob(b"SLQ\x01\x01\x02\x02" + struct.pack(">II", 4, 8), 39),
            "54 bytes; its shape \\(4, 8\\) needs 55",
        ),
        (_blob(b"SLQ\x01\x01\x02\x02" + struct.pack(">II", 4, 8), 41), "56 bytes"),
        (_blob(b"SLQ\x01\x01\x01\x03" + struct.pack(">III", 2, 2**20, 2**20), 8), "over"),
        (_blob(b"SLQ\x01\x01\x02\x02" + struct.pack(">II", 300, 8), 8), "batch of 300"),
        (_blob(b"SLQ\x01\x01\x02\x02" + struct.pack(">II", 0, 5), 0), "holds no sample"),
    ],
)
def test_malformed_blobs_are_refused(blob: torch.Tensor, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        read_tensor(Message(kind=Kind.FORWARD, tensors={"act": blob}), "act", max_batch=256)


@settings(max_examples=200, deadline=None)
@given(
    head=st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([0, 1, 2, 4, 8]), st.integers(0, 9)),
    dims=st.lists(st.integers(0, 6) | st.integers(0, 2**32 - 1), max_size=9),
    slack=st.integers(-3, 3),
    fill=st.binary(min_size=1, max_size=16),
)
def test_any_blob_a_peer_sends_decodes_or_is_a_protocol_error(
    head: tuple[int, int, int], dims: list[int], slack: int, fill: bytes
) -> None:
    # Bodies near the length the head implies, so that the decoding itself is reached too
    mode, bits, ndim = head
    batch, count = (dims[0], math.prod(dims[1:])) if dims else (0, 1)
    params = 8 if mode == 1 else 4
    size = max(0, min(4096, batch * (params + -(-count * max(bits, 1) // 8)) + slack))
    body = (fill * (size // len(fill) + 1))[:size]
    raw = b"SLQ\x01" + bytes([mode, bits, ndim]) + struct.pack(f">{len(dims)}I", *dims) + body
    blob = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        out = read_tensor(Message(kind=Kind.FORWARD, tensors={"act": blob}), "act", 256)
    except ProtocolError:
        return
    assert out.dtype == torch.float32 and out.numel() * 4 <= lowbit.MAX_DECODED_BYTES
    assert tuple(out.shape) == tuple(dims) or len(dims) != ndim


def test_non_finite_parameters_are_refused() -> None:
    blob = wire_tensors("act", torch.randn(4, 6), "int2-ef")["act"].clone()
    params = blob[7 + 8 :].view(-1)[:8].clone().view(torch.float32)
    params[1] = float("inf")
    blob[7 + 8 : 7 + 8 + 8] = params.view(torch.uint8)
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        read_tensor(Message(kind=Kind.FORWARD, tensors={"act": blob}), "act")


# (u-shaped also sends the server's output, at 8 bits: it may be logits; so 5x, not 8x; its
# client keeps residuals of the gradient it sends back)
@pytest.mark.parametrize(
    ("topology", "fewer", "client_residuals"), [("vanilla", 8, 0), ("ushaped", 5, 1)]
)
def test_int2_ef_training_sends_8x_fewer_bytes_and_keeps_residuals(
    deployment, topology: str, fewer: int, client_residuals: int
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same one-epoch run in float32 and in int2-ef, real sockets and encryption
    runs = {}
    for dtype in ("float32", "int2-ef"):
        files = deployment(clients=1, dataset="breast_cancer", topology=topology, wire_dtype=dtype)
        # Execute
        runs[dtype] = asyncio.run(run_deployment(files))

    # Assert: actual wire bytes, both directions, per training step
    per_step = {
        dtype: (s["bytes_sent"] + s["bytes_received"]) / s["steps"]
        for dtype, run in runs.items()
        for s in run.summaries
    }
    assert per_step["float32"] > fewer * per_step["int2-ef"]
    summary = runs["int2-ef"].summaries[0]
    assert summary["test_accuracy"] > 0.8
    engine = runs["int2-ef"].server.engine
    assert len(engine.residuals) == 1  # the server's gradients to client-1 carry feedback
    runner = runs["int2-ef"].clients[0].runner
    assert len(runner.residuals) == client_residuals


def test_init_writes_int2_ef(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["init", str(tmp_path / "d"), "--wire-dtype", "int2-ef"]) == 0
    assert 'wire_dtype = "int2-ef"' in (tmp_path / "d" / "client-1.toml").read_text()
