"""Hostile numbers: an admitted peer's NaN, infinite or oversized values are refused before
they reach a shared model, and honest peers beside it train as they would alone (issue 15,
red-team findings B1, B2, B6)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments
from sl_pipeline.tensors import read_tensor, wire_tensors
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.topologies import build_engine

from .conftest import load_client, load_server
from .inprocess import wait_until
from .test_hostile_peers import assert_refused, assert_serving, join

NAN, INF = float("nan"), float("inf")


# ---- B1: non-finite tensors are refused where they are read ------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_read_tensor_refuses_non_finite_values_in_every_wire_dtype(dtype: str, bad: float) -> None:
    # Prepare: an honest tensor on the wire, then one value spoiled after encoding
    tensors = dict(wire_tensors("act", torch.randn(4, 6), dtype))
    spoiled = {"float32": "act", "float16": "act", "bfloat16": "act"}.get(dtype)
    if spoiled is None:  # quantised: the scale (int8) or the range (packed) carries floats
        spoiled = "act_scale" if dtype == "int8" else "act_range"
    tensors[spoiled] = tensors[spoiled].clone()
    tensors[spoiled].view(-1)[1] = bad
    # Execute / Assert
    honest = Message(kind=Kind.FORWARD, tensors=wire_tensors("act", torch.randn(4, 6), dtype))
    assert read_tensor(honest, "act").isfinite().all()
    with pytest.raises(ProtocolError, match="act holds NaN or infinite values"):
        read_tensor(Message(kind=Kind.FORWARD, tensors=tensors), "act")


@pytest.mark.parametrize("defer", [False, True], ids=["step-first", "reply-first"])
@pytest.mark.parametrize("scale", [NAN, 3e38], ids=["nan-act", "overflowing-act"])
def test_the_engine_never_steps_on_a_batch_it_refuses(
    deployment, defer: bool, scale: float
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer")
    cfg = load_server(files["server"])
    engine = build_engine(cfg, files["server"].parent)
    engine.defer_updates = defer
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    width = next(engine.model.parameters()).shape[1]
    act = torch.full((8, width), scale)
    labels = torch.zeros(8, dtype=torch.int64)
    bad = Message(kind=Kind.FORWARD, client="c", tensors={"act": act, "labels": labels})
    # Execute
    with pytest.raises(ProtocolError, match="not applied"):
        engine.handle(b"c", bad)
    engine.settle()
    # Assert: no step counted, no weight touched; the next honest batch still trains
    assert engine.steps_applied == 0
    after = engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    good = Message(
        kind=Kind.FORWARD,
        client="c",
        step=1,
        tensors={"act": torch.randn(8, width), "labels": labels},
    )
    ((_, reply),) = engine.handle(b"c", good)
    engine.settle()
    assert reply.kind is Kind.BACKWARD and engine.steps_applied == 1
    assert all(p.isfinite().all() for p in engine.model.parameters())


async def _train_alone(files: dict[str, Path], attack: Any = None) -> dict[str, Any]:
    """Serve ``files``; run ``attack(server, ctx, keys)`` first (as client-2), then client-1 to
    its end; client-1's summary."""
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"]), base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await wait_until(lambda: server.bound)
        if attack is not None:
            await attack(server, ctx, base / "keys")
        client = ClientWorker(load_client(files["client-1"]), base, progress=False)
        summary: dict[str, Any] = await asyncio.wait_for(client.run(), 120)
        assert not task.done()
        return summary
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


async def test_nan_activations_from_one_client_do_not_poison_an_honest_one(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: what client-1 achieves with nobody else on the server
    make = dict(clients=2, dataset="breast_cancer", epochs=2)
    alone = await _train_alone(deployment(**make))
    refusals: list[str] = []

    async def poison(server: ServerWorker, ctx: zmq.asyncio.Context, keys: Path) -> None:
        conn = await join(server.cfg.server.bind, server.fingerprint, keys, ctx, name="client-2")
        seg = build_segments(server.cfg.model, server.cfg.server.topology)[0]
        shape = seg(torch.zeros(2, *server.cfg.model.in_shape)).shape[1:]
        for step in range(3):
            act = torch.full((16, *shape), NAN)
            labels = torch.zeros(16, dtype=torch.int64)
            await conn.send(
                Message(kind=Kind.FORWARD, step=step, tensors={"act": act, "labels": labels})
            )
            refusals.append((await assert_refused(conn)).remote_code)
        await assert_serving(conn)
        assert server.steps_applied == 0
        conn.close()

    # Execute
    summary = await _train_alone(deployment(**make), poison)
    # Assert: every NaN step refused as a protocol error; client-1 trains as it does alone
    assert refusals == ["protocol"] * 3
    assert summary["steps"] == alone["steps"]
    assert summary["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=0.02)
