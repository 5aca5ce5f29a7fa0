"""A misbehaving peer gets an error and a log line; the server keeps serving the others."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from sl_pipeline.errors import PeerError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import generate_keypair, load_keypair, load_public_key
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.models import fingerprint
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker

from .conftest import load_client, load_server
from .test_hostile_peers import send_as_stranger


@pytest.fixture
async def running(
    deployment,
) -> AsyncIterator[tuple[ServerWorker, dict[str, Path], zmq.asyncio.Context]]:  # type: ignore[no-untyped-def]
    files = deployment(clients=2, dataset="breast_cancer", epochs=2)
    server = ServerWorker(
        load_server(files["server"], "limits.max_tensor_bytes=131072"), files["server"].parent
    )
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        yield server, files, ctx
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        ctx.destroy(linger=0)


def _hello(server: ServerWorker, name: str) -> dict[str, object]:
    return {"v": PROTOCOL_VERSION, "client": name, "model": server.fingerprint, "role": "trainer"}


async def _join(
    server: ServerWorker, files: dict[str, Path], ctx: zmq.asyncio.Context, name: str = "client-1"
) -> DealerConnection:
    keys = files["server"].parent / "keys"
    conn = DealerConnection(ctx, server.cfg.server.bind)
    hs = ClientHandshake(
        _hello(server, name),
        load_keypair(keys / f"{name}.key"),
        load_public_key(keys / "server.pub"),
    )
    await conn.handshake(hs, 5)
    return conn


async def test_malformed_and_oversized_messages_get_error_replies(
    running, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    server, files, ctx = running
    conn = await _join(server, files, ctx)
    caplog.set_level(logging.WARNING)
    # wrong shape of activations for the server segment
    bad = Message(
        kind=Kind.FORWARD,
        tensors={"act": torch.randn(4, 7), "labels": torch.zeros(4, dtype=torch.int64)},
    )
    with pytest.raises(PeerError, match=r"act has shape \[4, 7\]: one sample must be \[64\]"):
        await conn.send(bad)
        await conn.recv(5)
    # labels out of range
    bad = Message(
        kind=Kind.FORWARD, tensors={"act": torch.randn(4, 64), "labels": torch.full((4,), 9)}
    )
    with pytest.raises(PeerError, match="class indices"):
        await conn.send(bad)
        await conn.recv(5)
    # a tensor over the configured limit (128 KiB here) is refused from its header
    big = Message(
        kind=Kind.FORWARD,
        tensors={"act": torch.zeros(1024, 64), "labels": torch.zeros(1024, dtype=torch.int64)},
    )
    with pytest.raises(PeerError, match="limit"):
        await conn.send(big)
        await conn.recv(5)
    assert "(oversized)" in caplog.text
    assert "rejected message from client-1" in caplog.text
    # the same client still trains afterwards
    ok = Message(
        kind=Kind.FORWARD,
        step=1,
        tensors={"act": torch.randn(4, 64), "labels": torch.zeros(4, dtype=torch.int64)},
    )
    await conn.send(ok)
    reply = await conn.recv(5)
    assert reply.kind is Kind.BACKWARD and reply.tensor("grad").shape == (4, 64)
    conn.close()


async def test_tampered_and_unauthenticated_frames_are_refused(
    running, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    server, files, ctx = running
    caplog.set_level(logging.WARNING)
    conn = await _join(server, files, ctx)
    assert conn.channel is not None
    frames = [bytearray(f) for f in conn.channel.pack(Message(kind=Kind.HEARTBEAT))]
    frames[-1][0] ^= 1
    await conn.sock.send_multipart(frames)
    with pytest.raises(PeerError, match=r"crypto|tag|authentic"):
        await conn.recv(5)
    assert "bad_tag" in caplog.text
    # a stranger's garbage, without any key: refused while connecting, nothing is read
    refused = await send_as_stranger(server.cfg.server.bind, [b"\x00" * 16, b"garbage"], ctx)
    assert refused == "protocol"
    conn.close()


async def test_unadmitted_key_is_refused_while_admitted_client_trains(
    running, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    server, files, ctx = running
    caplog.set_level(logging.WARNING)
    keys = files["server"].parent / "keys"
    stranger = DealerConnection(ctx, server.cfg.server.bind)
    hs = ClientHandshake(
        _hello(server, "mallory"), generate_keypair(), load_public_key(keys / "server.pub")
    )
    honest = ClientWorker(load_client(files["client-2"]), files["client-2"].parent, progress=False)
    training = asyncio.create_task(honest.run())
    with pytest.raises(PeerError, match=r"not admitted|admitted"):
        await stranger.handshake(hs, 5)
    summary = await asyncio.wait_for(training, 60)
    assert summary["steps"] > 0 and summary["test_accuracy"] > 0.85
    assert "not_admitted" in caplog.text
    stranger.close()


async def test_retransmitted_step_is_answered_from_cache(running) -> None:  # type: ignore[no-untyped-def]
    server, files, ctx = running
    conn = await _join(server, files, ctx)
    msg = Message(
        kind=Kind.FORWARD,
        epoch=0,
        step=5,
        tensors={"act": torch.randn(4, 64), "labels": torch.zeros(4, dtype=torch.int64)},
    )
    await conn.send(msg)
    first = await conn.recv(5)
    await conn.send(msg)
    second = await conn.recv(5)
    assert torch.equal(first.tensor("grad"), second.tensor("grad"))
    assert server.steps_applied == 1
    conn.close()


def test_hello_for_a_different_model_is_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment()
    cfg = load_server(files["server"])
    assert fingerprint(cfg.model, "vanilla") != fingerprint(cfg.model, "ushaped")


async def test_stopping_server_tells_a_waiting_client_to_rejoin(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a client that has joined and waits for a reply when the server stops
    files = deployment(clients=1, dataset="breast_cancer")
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        conn = await _join(server, files, ctx)
        waiting = asyncio.create_task(conn.recv(30))
        await asyncio.sleep(0.2)
        # Execute
        stop.set()
        await asyncio.wait_for(task, 10)
        # Assert: told at once (not after the 30 s reply timeout), and told it may retry
        with pytest.raises(PeerError) as refused:
            await asyncio.wait_for(waiting, 5)
        assert refused.value.remote_code == "shutting_down"
        assert refused.value.retryable
        conn.close()
    finally:
        stop.set()
        ctx.destroy(linger=0)
