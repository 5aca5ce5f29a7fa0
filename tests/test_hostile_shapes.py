"""Hostile shapes: an admitted peer's tensor is refused on what it announces, before it is
decoded or any layer runs on it (issue 15, red-team findings A8 and A9).

A9: 2- and 4-bit packed codes widen 16x or 8x into float32, so the decoded size is bounded,
not only the bytes sent. A8: activations of the wrong per-sample shape (within every byte
limit) used to run through the server's conv layers before a later Linear refused them; the
shape each segment takes is now known from the model config and checked first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sl_pipeline import lowbit
from sl_pipeline.config import ModelConfig, RelayConfig, load
from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, segment_inputs
from sl_pipeline.tensors import read_tensor, wire_tensors
from workers.relay import RelayWorker
from workers.server.engines import Engine
from workers.tools.inprocess import wait_until
from workers.topologies import topology

from .conftest import load_server
from .test_hostile_numeric import serving
from .test_hostile_peers import assert_refused, assert_serving, join

WIRE_DTYPES = ["float32", "float16", "int8", "int4", "int2", "int2-ef"]


def engine_of(files: dict[str, Path]) -> Engine:
    cfg = load_server(files["server"])
    return topology(cfg.server.topology).engine(cfg, files["server"].parent)


def count_layer_calls(module: nn.Module) -> list[int]:
    """A spy: ``[n]``, n growing by one each time any layer of ``module`` runs."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    for layer in module.modules():
        layer.register_forward_pre_hook(hook)
    return calls


def count_unpacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy on the one place packed codes are widened into float32."""
    calls, real = [0], lowbit.unpack_rows

    def spy(*args: Any) -> torch.Tensor:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(lowbit, "unpack_rows", spy)
    return calls


def forward(tensors: dict[str, torch.Tensor], batch: int, labels: bool = True) -> Message:
    """A FORWARD with ``tensors`` and, unless u-shaped (labels stay at the client), labels."""
    extra = {"labels": torch.zeros(batch, dtype=torch.int64)} if labels else {}
    return Message(Kind.FORWARD, client="c", tensors={**tensors, **extra})


def packed_bomb(values_per_sample: int, bits: int) -> dict[str, torch.Tensor]:
    """The red team's A9 message: one sample of 0xFF bytes announcing ``[16, n/16]`` values.
    The bytes are one byte expanded (no memory here), so only a decode could cost any."""
    nbytes = values_per_sample * bits // 8
    return {
        "act": torch.full((1, 1), 0xFF, dtype=torch.uint8).expand(1, nbytes),
        "act_shape": torch.tensor([bits, 1, 16, values_per_sample // 16], dtype=torch.int64),
        "act_range": torch.tensor([[0.0, 1.0]]),
    }


# ---- A9: packed codes are bounded by their decoded size -------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_a_packed_code_bomb_is_refused_before_it_is_decoded(
    monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    # Prepare: 128 Mi values = 512 MiB of float32 from 32 MiB (int2) or 64 MiB (int4) sent
    unpacks = count_unpacks(monkeypatch)
    bomb = Message(Kind.FORWARD, tensors=packed_bomb(128 * 2**20, bits))
    # Execute / Assert: refused on the announced size, nothing widened
    with pytest.raises(ProtocolError, match=r"536870912 bytes once decoded, over 268435456"):
        read_tensor(bomb, "act", max_batch=256, max_abs=1e6)
    assert unpacks == [0]
    # ...while an honest packed tensor decodes through the same path
    honest = Message(
        Kind.FORWARD, tensors=wire_tensors("act", torch.rand(4, 16, 8, 8), f"int{bits}")
    )
    assert read_tensor(honest, "act").shape == (4, 16, 8, 8) and unpacks == [1]


def test_packed_codes_whose_shape_disagrees_with_their_bytes_are_refused() -> None:
    tensors = dict(wire_tensors("act", torch.rand(2, 30), "int2"))
    tensors["act_shape"] = torch.tensor([2, 2, 31], dtype=torch.int64)  # 8 bytes hold 32 codes
    tensors["act"] = tensors["act"][:, :7]
    with pytest.raises(ProtocolError, match="not shape"):
        read_tensor(Message(Kind.FORWARD, tensors=tensors), "act")


def test_a_packed_gradient_bomb_is_refused_at_the_ushaped_server(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: an open u-shaped step, from honest activations
    engine = engine_of(deployment(topology="ushaped", clients=1))
    shape = engine.act_shape
    assert shape is not None
    honest = forward(dict(wire_tensors("act", torch.rand(4, *shape), "float32")), 4, False)
    ((_, result),) = engine.handle(b"c", honest)
    unpacks = count_unpacks(monkeypatch)
    bomb = Message(Kind.BACKWARD, client="c", tensors=packed_bomb(128 * 2**20, 2))
    bomb = Message(
        Kind.BACKWARD, client="c", tensors={f"grad{k[3:]}": v for k, v in bomb.tensors.items()}
    )
    # Execute / Assert: refused before decoding, the step left open for an honest gradient
    with pytest.raises(ProtocolError, match=r"grad has shape \[1, 16, 8388608\]"):
        engine.handle(b"c", bomb)
    assert unpacks == [0] and engine.steps_applied == 0
    grad = wire_tensors("grad", torch.randn(read_tensor(result, "out").shape), "int2")
    ((_, reply),) = engine.handle(b"c", Message(Kind.BACKWARD, client="c", tensors=grad))
    assert reply.kind is Kind.BACKWARD and engine.steps_applied == 1 and unpacks == [1]


def test_a_packed_gradient_for_a_larger_batch_is_refused_before_it_is_decoded(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: an open u-shaped step of 4 samples; a packed gradient of the right sample
    # shape that announces 64 times the batch (red team 15, round 2)
    engine = engine_of(deployment(topology="ushaped", clients=1))
    shape = engine.act_shape
    assert shape is not None
    honest = forward(dict(wire_tensors("act", torch.rand(4, *shape), "float32")), 4, False)
    ((_, result),) = engine.handle(b"c", honest)
    out_shape = read_tensor(result, "out").shape
    unpacks = count_unpacks(monkeypatch)
    grad = wire_tensors("grad", torch.randn(256, *out_shape[1:]), "int2")
    # Execute / Assert: refused on the announced batch, nothing decoded, the step still open
    with pytest.raises(ProtocolError, match="grad holds a batch of 256 samples"):
        engine.handle(b"c", Message(Kind.BACKWARD, client="c", tensors=grad))
    assert unpacks == [0] and engine.steps_applied == 0
    grad = wire_tensors("grad", torch.randn(out_shape), "int2")
    ((_, reply),) = engine.handle(b"c", Message(Kind.BACKWARD, client="c", tensors=grad))
    assert reply.kind is Kind.BACKWARD and engine.steps_applied == 1


# ---- A8: activations of the wrong shape never reach a layer ---------------------------------
def test_each_segment_knows_the_sample_shape_it_takes() -> None:
    cfg = ModelConfig(builtin="cnn", in_shape=[1, 8, 8], classes=10)
    segments = build_segments(cfg, "ushaped")
    state = torch.random.get_rng_state()
    shapes = segment_inputs(segments, cfg.in_shape)
    assert shapes == [(1, 8, 8), (16, 4, 4), (64,)]
    assert torch.equal(state, torch.random.get_rng_state())  # meta tensors: no RNG, no memory
    # A model that does not run on its in_shape checks nothing (in_shape is in doubt)
    wrong = ModelConfig(builtin="mlp", in_shape=[1, 8, 8], classes=10)
    assert segment_inputs(build_segments(wrong), wrong.in_shape) == [None, None]


def _wrong(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The A8 message: the right channels, a much larger last dimension."""
    return (*shape[:-1], shape[-1] * 5)


@pytest.mark.parametrize("topo", ["vanilla", "ushaped", "roundrobin", "splitfed", "multitask"])
def test_a_wrong_shaped_act_is_refused_before_any_layer_runs(deployment, topo: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    kwargs: dict[str, Any] = {"clients": 1 if topo in ("vanilla", "ushaped") else 2}
    engine = engine_of(deployment(topology=topo, **kwargs))
    shape = engine.act_shape
    assert shape is not None
    calls = count_layer_calls(engine.model)
    wrong = forward({"act": torch.rand(2, *_wrong(shape))}, 2, topo != "ushaped")
    # Execute / Assert: refused naming both shapes, for training and evaluation alike
    expected = rf"act has shape \[2, {', '.join(map(str, _wrong(shape)))}\]: one sample must be"
    with pytest.raises(ProtocolError, match=expected + rf" \[{', '.join(map(str, shape))}\]"):
        engine.handle(b"c", wrong)
    with pytest.raises(ProtocolError, match=expected):
        engine.evaluate(b"c", Message(Kind.EVALUATE, client="c", tensors=dict(wrong.tensors)))
    assert calls == [0] and engine.steps_applied == 0


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_the_shape_check_holds_in_every_wire_dtype_and_passes_honest_steps(
    deployment, dtype: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the honest activations are the client segment's output on a digits-sized input
    files = deployment(clients=1)
    engine = engine_of(files)
    cfg = load_server(files["server"])
    bottom = build_segments(cfg.model, "vanilla")[0]
    honest = bottom(torch.rand(8, *cfg.model.in_shape)).detach()
    assert engine.act_shape == tuple(honest.shape[1:])
    calls = count_layer_calls(engine.model)
    # Execute / Assert: the wrong shape is refused in this dtype before a layer runs...
    bad = dict(wire_tensors("act", torch.rand(8, *_wrong(engine.act_shape)), dtype))
    with pytest.raises(ProtocolError, match="one sample must be"):
        engine.handle(b"c", forward(bad, 8))
    assert calls == [0]
    # ...and the honest one trains
    ((_, reply),) = engine.handle(b"c", forward(dict(wire_tensors("act", honest, dtype)), 8))
    assert reply.kind is Kind.BACKWARD and engine.steps_applied == 1 and calls[0] > 0


def test_a_vertical_party_with_the_wrong_cut_width_is_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    engine = engine_of(deployment(topology="vertical", clients=2, dataset="breast_cancer"))
    hidden = engine.cfg.model.hidden
    assert engine.act_shape == (hidden,)
    calls = count_layer_calls(engine.model)
    ids = torch.arange(4)
    msg = Message(Kind.FORWARD, client="c", tensors={"act": torch.rand(4, hidden + 1), "ids": ids})
    with pytest.raises(ProtocolError, match=rf"one sample must be \[{hidden}\]"):
        engine.handle(b"c", msg)
    assert calls == [0] and engine.queue_depth() == 0


async def test_a_relay_refuses_a_wrong_shaped_act_before_its_segment_runs(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a multi-hop chain (digits, a conv segment at the relay)
    files = deployment(topology="multihop", clients=1)
    base = files["server"].parent
    relay = RelayWorker(load(RelayConfig, files["relay-1"]), base)
    shape = relay.act_shape
    assert shape is not None and len(shape) == 3
    calls = count_layer_calls(relay.segment)
    async with serving(files) as (_, ctx, _):
        stop = asyncio.Event()
        task = asyncio.create_task(relay.serve(stop))
        try:
            await wait_until(relay.ready)
            conn = await join(
                relay.cfg.relay.bind, relay.fingerprint, base / "keys", ctx, server="relay-1"
            )
            # Execute
            await conn.send(forward({"act": torch.rand(1, *_wrong(shape))}, 1))
            # Assert: refused naming the shape; the relay serves on and ran nothing
            error = await assert_refused(conn)
            assert error.remote_code == "protocol" and "one sample must be" in str(error)
            await assert_serving(conn, task)
            assert calls == [0] and relay.steps_applied == 0
            conn.close()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
