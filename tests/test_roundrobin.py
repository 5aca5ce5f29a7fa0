"""Round-robin: the sealed weights are bound to the run and the turn, which the client
computes itself (issue 15 finding 6), and the turn state is the server's to checkpoint."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import torch

from sl_pipeline.config import ClientConfig, load, resolve_path
from sl_pipeline.errors import CryptoError, ProtocolError
from sl_pipeline.group import load_group_key, open_weights, run_id, seal_weights
from sl_pipeline.messages import Kind, Message
from workers.client.group import RoundRobinRunner, load_segment_vector, segment_vector
from workers.client.worker import ClientWorker
from workers.runtime.checkpoint import decode, encode
from workers.server.engines.group import TurnCoordinator

MEMBERS = ["client-1", "client-2"]


class FakeServer:
    """Stands in for the server's grant: whatever this test wants a server to hand over."""

    def __init__(self) -> None:
        self.turn = 0
        self.run: dict[str, str] = {}
        self.sealed: torch.Tensor | None = None
        self.sent: list[Message] = []

    async def request(self, message: Message, timeout_s: float | None = None) -> Message:
        msg = message
        self.sent.append(msg)
        if msg.meta["op"] == "release":
            return msg.reply(Kind.WEIGHTS, meta={"op": "ack"})
        tensors = {} if self.sealed is None else {"sealed": self.sealed}
        meta = {"op": "grant", "turn": self.turn, "run": self.run}
        return msg.reply(Kind.WEIGHTS, meta=meta, tensors=tensors)


def _client(files: dict[str, Path], server: FakeServer) -> ClientWorker:
    worker = ClientWorker(
        load(ClientConfig, files["client-2"]), files["client-2"].parent, progress=False
    )
    worker.request = server.request  # type: ignore[method-assign]
    server.run = {"client-1": secrets.token_hex(32), "client-2": _runner(worker).run_nonce}
    return worker


def _runner(worker: ClientWorker) -> RoundRobinRunner:
    assert isinstance(worker.runner, RoundRobinRunner)
    return worker.runner


def _key(worker: ClientWorker) -> bytes:
    path = resolve_path(worker.base, worker.cfg.client.group_key, "client.group_key")
    return load_group_key(path)


def _weights(worker: ClientWorker) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(worker.bottom.parameters()).detach()


@pytest.fixture
def files(deployment) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return deployment(topology="roundrobin", clients=2, dataset="breast_cancer", epochs=2)


async def test_the_client_takes_the_weights_sealed_for_its_turn(files) -> None:  # type: ignore[no-untyped-def]
    server = FakeServer()
    worker = _client(files, server)
    sent = torch.randn(_weights(worker).numel())
    server.turn = 1  # client-2 goes second: one turn is done before its first
    server.sealed = seal_weights(_key(worker), sent, run_id(server.run), 1)
    await worker.runner.before_epoch(0)
    assert torch.equal(_weights(worker), sent)
    await worker.runner.after_epoch(0)  # sealed for turn 2 of the same run
    release = server.sent[-1]
    opened = open_weights(_key(worker), release.tensors["sealed"], run_id(server.run), 2)
    assert release.meta["op"] == "release" and torch.equal(opened, _weights(worker))
    assert server.sent[0].meta["run"] == _runner(worker).run_nonce


async def test_an_older_blob_is_refused(files) -> None:  # type: ignore[no-untyped-def]
    server = FakeServer()
    worker = _client(files, server)
    server.turn, key = 1, _key(worker)
    server.sealed = seal_weights(key, torch.randn(_weights(worker).numel()), run_id(server.run), 1)
    await worker.runner.before_epoch(0)
    server.turn = 3  # the grant's number is right, the blob is the one of turn 1
    with pytest.raises(CryptoError, match="not sealed at turn 3"):
        await worker.runner.before_epoch(1)


async def test_a_rolled_back_turn_number_is_refused(files) -> None:  # type: ignore[no-untyped-def]
    server = FakeServer()
    worker = _client(files, server)
    server.turn, key = 1, _key(worker)
    server.sealed = seal_weights(key, torch.randn(_weights(worker).numel()), run_id(server.run), 1)
    await worker.runner.before_epoch(0)
    with pytest.raises(ProtocolError, match="granted turn 1, but this client's turn is 3"):
        await worker.runner.before_epoch(1)  # the same grant again, a round later


async def test_a_blob_from_an_earlier_run_with_the_same_key_is_refused(files) -> None:  # type: ignore[no-untyped-def]
    earlier = FakeServer()
    first = _client(files, earlier)
    old_blob = seal_weights(_key(first), _weights(first), run_id(earlier.run), 1)
    server = FakeServer()
    again = _client(files, server)  # the same configs and group key: a new run
    assert _runner(again).run_nonce != _runner(first).run_nonce
    server.turn, server.sealed = 1, old_blob
    with pytest.raises(CryptoError, match="not sealed at turn 1 of this run"):
        await again.runner.before_epoch(0)
    server.run = dict(earlier.run)  # or the earlier run's members, replayed
    with pytest.raises(CryptoError, match="another run"):
        await again.runner.before_epoch(0)


async def test_no_weights_before_the_first_turn(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="roundrobin", clients=2, dataset="breast_cancer", epochs=2)
    server = FakeServer()
    worker = ClientWorker(
        load(ClientConfig, files["client-1"]), files["client-1"].parent, progress=False
    )
    worker.request = server.request  # type: ignore[method-assign]
    server.run = {"client-1": _runner(worker).run_nonce, "client-2": secrets.token_hex(32)}
    server.sealed = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ProtocolError, match="before the first turn"):
        await worker.runner.before_epoch(0)


# ---- the server's turn coordinator ---------------------------------------------------------
def _acquire(name: str, nonce: str, epoch: int = 0) -> Message:
    meta: dict[str, Any] = {"op": "acquire", "final": False, "run": nonce}
    return Message(kind=Kind.WEIGHTS, client=name, epoch=epoch, step=0, meta=meta)


def _release(name: str, epoch: int = 0) -> Message:
    tensors = {"sealed": torch.arange(40, dtype=torch.uint8)}
    meta = {"op": "release"}
    return Message(kind=Kind.WEIGHTS, client=name, epoch=epoch, step=1, meta=meta, tensors=tensors)


def test_sub_names_never_fill_the_group() -> None:
    turns = TurnCoordinator(MEMBERS, epochs=2)
    for fake in ("client-1/x", "client-1/y"):
        with pytest.raises(ProtocolError, match="not a member"):
            turns.handle(b"1", _acquire(fake, secrets.token_hex(32)))
    nonces = {n: secrets.token_hex(32) for n in MEMBERS}
    assert turns.handle(b"1", _acquire("client-1", nonces["client-1"])) == []
    grants = turns.handle(b"2", _acquire("client-2", nonces["client-2"]))
    assert [(i, m.meta["turn"], dict(m.meta["run"])) for i, m in grants] == [(b"1", 0, nonces)]
    with pytest.raises(ProtocolError, match="another run"):
        turns.handle(b"1", _acquire("client-1", secrets.token_hex(32)))


def test_turn_state_survives_a_checkpoint() -> None:
    nonces = {n: secrets.token_hex(32) for n in MEMBERS}
    turns = TurnCoordinator(MEMBERS, epochs=2)
    turns.handle(b"1", _acquire("client-1", nonces["client-1"]))
    turns.handle(b"2", _acquire("client-2", nonces["client-2"]))
    turns.handle(b"1", _release("client-1"))  # client-2's turn now: grant sent
    turns.handle(b"1", _acquire("client-1", nonces["client-1"], epoch=1))  # waits
    version = turns.version
    state, _ = decode(encode({"group": turns.state_dict()}, 0))
    restored = TurnCoordinator(MEMBERS, epochs=2)
    restored.load_state_dict(state["group"])
    assert (restored.turn, restored.run_nonces, list(restored.waiting)) == (1, nonces, ["client-1"])
    assert restored.blob is not None and torch.equal(restored.blob, turns.blob)  # type: ignore[arg-type]
    replies = restored.handle(b"2", _release("client-2"))  # the turn passes on after a restart
    # client-1's restored request has no connection: ZeroMQ numbers a restarted server's
    # connections from the same start, so its old identity may now be someone else's. The
    # grant goes to the reply cache only, which answers client-1's resent acquire.
    assert [(i, m.meta["op"]) for i, m in replies] == [(b"2", "ack"), (b"", "grant")]
    assert replies[1][1].meta["turn"] == 2 and version > 0


def test_group_weights_travel_in_host_memory_and_land_on_the_segments_device() -> None:
    # Prepare: a segment on a device other than the CPU ("meta" stands in for a GPU here:
    # a parameter's data cannot be swapped for a tensor on another device, on either)
    segment = torch.nn.Linear(3, 2, device="meta")
    weights = torch.arange(8, dtype=torch.float64)  # what the wire hands over
    # Execute
    load_segment_vector(segment, weights)
    sent = segment_vector(torch.nn.Linear(3, 2))
    # Assert: loaded where the segment trains, in float32; sent from host memory
    assert {p.device.type for p in segment.parameters()} == {"meta"}
    assert {p.dtype for p in segment.parameters()} == {torch.float32}
    assert sent.device.type == "cpu" and sent.shape == (8,) and not sent.requires_grad
