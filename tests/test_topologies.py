"""Every configuration from the project page: what each party receives, and nothing more."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from sl_pipeline.errors import CryptoError
from sl_pipeline.group import open_weights
from sl_pipeline.messages import Message
from workers.client.worker import ClientWorker
from workers.relay import RelayWorker
from workers.runtime.service import RouterService
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment, wait_until


def record_inbound(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """Every message a server or relay accepts, as its dispatch sees it."""
    seen: list[Message] = []
    from workers.relay import RelayWorker
    from workers.server.worker import ServerWorker

    for cls in (ServerWorker, RelayWorker):
        original = cls.dispatch

        async def spy(
            self: RouterService, identity: bytes, peer: Any, msg: Message, _orig: Any = original
        ) -> Any:
            seen.append(msg)
            return await _orig(self, identity, peer, msg)

        monkeypatch.setattr(cls, "dispatch", spy)
    return seen


def record_received(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Message]]:
    """Every message each client receives."""
    from sl_pipeline.transport import DealerConnection

    received: dict[str, list[Message]] = {}
    original = DealerConnection.recv

    async def spy(self: DealerConnection, timeout_s: float) -> Message:
        msg = await original(self, timeout_s)
        received.setdefault(msg.client, []).append(msg)
        return msg

    monkeypatch.setattr(DealerConnection, "recv", spy)
    return received


async def test_ushaped_server_never_receives_labels(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen = record_inbound(monkeypatch)
    run = await run_deployment(deployment(topology="ushaped", dataset="digits", epochs=2))
    assert run.summaries[0]["test_accuracy"] > 0.75
    assert seen and all("labels" not in m.tensors for m in seen)
    assert all(t.dtype.is_floating_point for m in seen for t in m.tensors.values())


async def test_vertical_parties_receive_only_their_own_gradient(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    received = record_received(monkeypatch)
    run = await run_deployment(
        deployment(topology="vertical", clients=2, dataset="breast_cancer", epochs=2)
    )
    for client in run.clients:
        assert client.data.train.y is None  # a feature party holds no labels
    # ... and is told no score: the label holder (the server) measures the accuracy itself
    assert all(s["test_accuracy"] is None for s in run.summaries)
    assert run.server.book.latest().accuracies["server"] > 0.9
    assert run.server.engine.test_accuracy > 0.9
    for messages in received.values():
        for msg in messages:
            assert set(msg.tensors) <= {"grad", "out"}, msg.tensors.keys()
            if "grad" in msg.tensors:  # the gradient of this party's own 64-unit output only
                assert msg.tensors["grad"].shape[1] == 64
            if "out" in msg.tensors:  # evaluation: no outputs of labelled rows (label leak)
                assert msg.tensors["out"].shape[1] == 0
    assert set(received) == {"client-1", "client-2"}


async def test_vertical_server_gets_no_features_and_aligned_ids(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen = record_inbound(monkeypatch)
    await run_deployment(
        deployment(topology="vertical", clients=2, dataset="breast_cancer", epochs=1)
    )
    forwards = [m for m in seen if m.kind.value == "forward"]
    assert forwards and all(set(m.tensors) == {"act", "ids"} for m in forwards)
    by_step: dict[tuple[int, int], list[Message]] = {}
    for m in forwards:
        by_step.setdefault((m.epoch, m.step), []).append(m)
    for parts in by_step.values():
        assert len(parts) == 2 and torch.equal(parts[0].tensors["ids"], parts[1].tensors["ids"])


async def test_roundrobin_weights_are_unreadable_by_the_server(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen = record_inbound(monkeypatch)
    run = await run_deployment(
        deployment(topology="roundrobin", clients=2, dataset="breast_cancer", epochs=2)
    )
    blobs = [m.tensors["sealed"] for m in seen if "sealed" in m.tensors]
    assert len(blobs) == 4  # 2 clients x 2 epochs
    final = torch.nn.utils.parameters_to_vector(run.clients[0].bottom.parameters()).detach()
    raw = final.numpy().tobytes()
    for blob in blobs:
        data = blob.numpy().tobytes()
        assert raw[:64] not in data and len(data) == 12 + len(raw) + 16
        with pytest.raises(CryptoError):
            open_weights(b"\x00" * 32, blob, b"\x00" * 32, 1)  # the server has no group key
    # both clients end with the same (last) weights
    other = torch.nn.utils.parameters_to_vector(run.clients[1].bottom.parameters()).detach()
    assert torch.equal(final, other)


async def test_splitfed_server_sees_only_masked_weights(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen = record_inbound(monkeypatch)
    run = await run_deployment(
        deployment(topology="splitfed", clients=2, dataset="breast_cancer", epochs=2)
    )
    masked = [m.tensors["masked"] for m in seen if "masked" in m.tensors]
    assert len(masked) == 4
    a, b = (
        torch.nn.utils.parameters_to_vector(c.bottom.parameters()).detach() for c in run.clients
    )
    assert torch.allclose(a, b, atol=1e-6)  # averaged: every client holds the same segment
    fixed = torch.round(a.double() * 2**24).long()
    for m in masked:  # the masked vector looks nothing like the fixed-point weights
        assert (m - fixed).abs().float().mean() > 1e15


async def test_multitask_clients_share_the_trunk(deployment) -> None:  # type: ignore[no-untyped-def]
    run = await run_deployment(
        deployment(topology="multitask", clients=2, dataset="digits", epochs=2)
    )
    tasks = {s["client"]: s["test_accuracy"] for s in run.summaries}
    assert tasks["client-1"] > 0.8 and tasks["client-2"] > 0.8
    assert run.server.engine.steps_applied == sum(s["steps"] for s in run.summaries)


async def test_multihop_passes_through_the_relay(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen = record_inbound(monkeypatch)
    run = await run_deployment(deployment(topology="multihop", dataset="digits", epochs=2))
    assert run.summaries[0]["test_accuracy"] > 0.75
    assert run.relay.steps_applied == run.summaries[0]["steps"]
    shapes = {tuple(m.tensors["act"].shape[1:]) for m in seen if m.kind.value == "forward"}
    assert shapes == {(16, 4, 4), (512,)}  # what the relay receives, what the server receives


async def test_ushaped_serves_several_clients_one_open_step_at_a_time(deployment) -> None:  # type: ignore[no-untyped-def]
    run = await run_deployment(
        deployment(topology="ushaped", clients=2, dataset="breast_cancer", epochs=2)
    )
    assert [s["test_accuracy"] > 0.9 for s in run.summaries] == [True, True]
    assert run.server.engine.steps_applied == sum(s["steps"] for s in run.summaries)


async def test_a_full_server_says_so_and_the_client_retries(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=2, dataset="breast_cancer", epochs=1)
    run = await run_deployment(files, server_overrides=("server.max_clients=1",))
    summaries = run.summaries
    assert all(s["steps"] > 0 for s in summaries)
    assert max(s["retries"] for s in summaries) > 0  # one of them waited for a free slot
    assert run.server.metrics.rejected_messages_total.labels(reason="overloaded")._value.get() > 0


async def test_pipelined_client_keeps_steps_in_flight_and_applies_each_once(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=3)
    plain = (await run_deployment(deployment(dataset="breast_cancer", epochs=3))).summaries[0]
    run = await run_deployment(files, "train.pipeline_depth=3")
    summary = run.summaries[0]
    assert summary["steps"] == plain["steps"] == run.server.steps_applied
    assert summary["test_accuracy"] >= plain["test_accuracy"] - 0.03  # stale by <= 2 steps


async def test_auto_pipeline_depth_chooses_a_depth_and_applies_each_step_once(deployment) -> None:  # type: ignore[no-untyped-def]
    # Execute: pipeline_depth = 0 is --pipeline-depth auto
    files = deployment(dataset="breast_cancer", epochs=2)
    run = await run_deployment(files, "train.pipeline_depth=0")

    # Assert: the depth it chose is a real depth, and no step was lost or applied twice
    summary = run.summaries[0]
    assert 1 <= summary["pipeline_depth"] <= 16
    assert summary["steps"] == run.server.steps_applied > 0


def test_pipelining_is_refused_where_a_step_needs_two_exchanges(deployment) -> None:  # type: ignore[no-untyped-def]
    from sl_pipeline.errors import ConfigError
    from workers.client.worker import ClientWorker

    from .conftest import load_client

    files = deployment(topology="ushaped", dataset="breast_cancer")
    with pytest.raises(ConfigError, match="pipeline_depth"):
        ClientWorker(
            load_client(files["client-1"], "train.pipeline_depth=2"), files["server"].parent
        )


async def test_vertical_with_a_label_client_keeps_labels_off_the_server(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen = record_inbound(monkeypatch)
    received = record_received(monkeypatch)
    files = deployment(
        topology="vertical", clients=2, dataset="breast_cancer", epochs=3, label_client=True
    )
    run = await run_deployment(files)
    label, feature = run.summaries
    assert run.server.engine.labels is None  # the server never loaded labels
    assert label["test_accuracy"] > 0.9 and feature["test_accuracy"] is None
    assert all("labels" not in m.tensors for m in seen)
    # the feature party gets only its own gradient; the label client also gets fused outputs
    assert {k for m in received["client-2"] for k in m.tensors} <= {"grad", "out"}
    assert all(m.kind.value == "backward" for m in received["client-2"] if "grad" in m.tensors)
    assert run.server.engine.steps_applied == label["steps"] == feature["steps"]


async def test_relay_rejoins_a_restarted_server_and_training_finishes(
    deployment, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client -> relay -> server, training under way
    files = deployment(topology="multihop", dataset="breast_cancer", epochs=2)
    base = files["server"].parent
    server_cfg = load(ServerConfig, files["server"])
    first_stop, second_stop, relay_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    first_server = ServerWorker(server_cfg, base)
    first = asyncio.create_task(first_server.serve(first_stop))
    await wait_until(first_server.ready)
    relay = RelayWorker(load(RelayConfig, files["relay-1"]), base)
    relaying = asyncio.create_task(relay.serve(relay_stop))
    await wait_until(relay.ready)
    client = ClientWorker(load(ClientConfig, files["client-1"]), base, progress=False)
    # The scenario forces its order: after 3 steps the client holds its next request until
    # the server has been restarted, so it can never finish before the restart.
    held, restarted = asyncio.Event(), asyncio.Event()
    send = client.request

    async def held_after_three_steps(message, timeout_s=None):  # type: ignore[no-untyped-def]
        if client.steps_done >= 3 and not restarted.is_set():
            held.set()
            await restarted.wait()
        return await send(message, timeout_s)

    client.request = held_after_three_steps  # type: ignore[method-assign]
    training = asyncio.create_task(client.run())
    second = None
    try:
        await asyncio.wait_for(held.wait(), 60)
        # Execute: stop the server gracefully and start a fresh one on the same address
        with caplog.at_level(logging.WARNING, logger="sl_pipeline.relay"):
            first_stop.set()
            await asyncio.wait_for(first, 10)
            second = asyncio.create_task(ServerWorker(server_cfg, base).serve(second_stop))
            restarted.set()
            summary = await asyncio.wait_for(training, 120)
        # Assert: the relay rejoined upstream and the client trained every step
        assert "rejoining" in caplog.text
        assert summary["steps"] == relay.steps_applied > 3
    finally:
        for event in (first_stop, second_stop, relay_stop):
            event.set()
        pending = [t for t in (first, second, relaying, training) if t is not None]
        await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 15)


@pytest.mark.parametrize(
    ("step_ms", "round_trip_ms", "client_ms", "depth"),
    [
        (10.0, 0.0, 5.0, 2),  # no latency: client and server alternate, two in flight
        (66.0, 40.0, 6.0, 4),  # 40 ms link, server 20 ms: 66 / 20 -> 4
        (52.0, 40.0, 6.0, 9),  # server 6 ms too: 52 / 6 -> 9
        (200.0, 190.0, 2.0, 16),  # 200 / 8 -> 25, but auto stops at 16
        (5.0, 1.0, 4.0, 2),  # the client is the slower party
    ],
)
def test_auto_depth_keeps_the_slower_party_busy(
    step_ms: float, round_trip_ms: float, client_ms: float, depth: int
) -> None:
    from workers.client.microbatch import auto_depth

    assert auto_depth(step_ms / 1e3, round_trip_ms / 1e3, client_ms / 1e3) == depth
