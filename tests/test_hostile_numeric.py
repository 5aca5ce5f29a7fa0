"""Hostile numbers: an admitted peer's NaN, infinite or oversized values are refused before
they reach a shared model, and honest peers beside it train as they would alone (issue 15,
red-team findings B1, B2, B6)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio
from torch.nn.utils import parameters_to_vector

from sl_pipeline.config import RelayConfig, ServerConfig, load
from sl_pipeline.errors import ConfigError, LimitError, ProtocolError, TransportError
from sl_pipeline.handshake import ClientHandshake, ServerHandshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments
from sl_pipeline.secagg import MaskingKeys
from sl_pipeline.tensors import all_finite, read_tensor, wire_tensors
from sl_pipeline.transport import Channel
from workers.client.worker import ClientWorker
from workers.relay import RelayWorker
from workers.runtime.peers import Listen, Peer, PeerTable
from workers.server.engines import Engine
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until
from workers.topologies import topology

from .conftest import load_client, load_server
from .test_hostile_peers import assert_refused, assert_serving, header, join, send_raw
from .test_secagg import FakeRound, _splitfed_client

NAN, INF = float("nan"), float("inf")


def server_engine(cfg: ServerConfig, base: Path) -> Engine:
    """The engine a server of ``cfg`` builds: the one its topology names."""
    return topology(cfg.server.topology).engine(cfg, base)


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


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_read_tensor_refuses_values_beyond_the_magnitude_bound(dtype: str) -> None:
    # Prepare: an honest batch, and the same with one value far beyond the bound
    honest = torch.randn(4, 6)
    huge = honest.clone()
    huge[1, 2] = 6e4 if dtype == "float16" else 1e30  # float16 tops out at 65504
    # Execute / Assert: refused only beyond limits.max_abs_value, with the key to change
    read = Message(kind=Kind.FORWARD, tensors=wire_tensors("act", honest, dtype))
    assert read_tensor(read, "act", max_abs=1e3).isfinite().all()
    spoiled = Message(kind=Kind.FORWARD, tensors=wire_tensors("act", huge, dtype))
    with pytest.raises(
        ProtocolError, match=r"act holds a value of magnitude .*limits.max_abs_value"
    ):
        read_tensor(spoiled, "act", max_abs=1e3)
    assert read_tensor(spoiled, "act").abs().max() > 1e3  # no bound given, none applied


def test_all_finite_takes_finite_float64_beyond_float32s_range_as_finite() -> None:
    # Prepare: tensors too many to reduce as one concatenation, one holding 1e300 (finite)
    big = torch.zeros(700_000, dtype=torch.float64)
    big[3] = 1e300
    other = torch.zeros(700_000, dtype=torch.float64)
    # Execute / Assert: finite, and a NaN among them is still found
    assert all_finite([big, other])
    other[5] = NAN
    assert not all_finite([big, other])


@pytest.mark.parametrize("defer", [False, True], ids=["step-first", "reply-first"])
@pytest.mark.parametrize("scale", [NAN, 3e38], ids=["nan-act", "overflowing-act"])
def test_the_engine_never_steps_on_a_batch_it_refuses(
    deployment, defer: bool, scale: float
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer")
    cfg = load_server(files["server"])
    engine = server_engine(cfg, files["server"].parent)
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


@contextlib.asynccontextmanager
async def serving(
    files: dict[str, Path], *sets: str
) -> AsyncIterator[tuple[ServerWorker, zmq.asyncio.Context, asyncio.Task[Any]]]:
    """A server for ``files`` (with ``sets`` overrides), bound, and a context for peers;
    both stopped afterwards."""
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await wait_until(lambda: server.bound)
        yield server, ctx, task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


async def _train_alone(files: dict[str, Path], attack: Any = None) -> dict[str, Any]:
    """Serve ``files``; run ``attack(server, ctx, keys)`` first (as client-2), then client-1 to
    its end; client-1's summary."""
    base = files["server"].parent
    async with serving(files) as (server, ctx, task):
        if attack is not None:
            await attack(server, ctx, base / "keys")
        client = ClientWorker(load_client(files["client-1"]), base, progress=False)
        summary: dict[str, Any] = await asyncio.wait_for(client.run(), 120)
        assert not task.done()
        return summary


@pytest.mark.parametrize("value", [NAN, 1e30], ids=["nan", "huge-finite"])
async def test_nan_activations_from_one_client_do_not_poison_an_honest_one(
    deployment, value: float
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: what client-1 achieves with nobody else on the server
    make = dict(clients=2, dataset="breast_cancer", epochs=2)
    alone = await _train_alone(deployment(**make))
    refusals: list[str] = []

    async def poison(server: ServerWorker, ctx: zmq.asyncio.Context, keys: Path) -> None:
        conn = await join(server.cfg.server.bind, server.fingerprint, keys, ctx, name="client-2")
        seg = build_segments(server.cfg.model, server.cfg.server.topology)[0]
        shape = seg(torch.zeros(2, *server.cfg.model.in_shape)).shape[1:]
        for step in range(3):
            act = torch.full((16, *shape), value)
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


# ---- B2: a SplitFed member's garbage submission is not loaded --------------------------------
class GarbageSum(FakeRound):
    """The server's honest sum of a round where one member submitted random words."""

    async def request(self, message: Message, timeout_s: float | None = None) -> Message:
        reply = await super().request(message, timeout_s)
        if "sum" not in reply.tensors:
            return reply
        words = torch.randint(-(2**62), 2**62, reply.tensors["sum"].shape, dtype=torch.int64)
        return reply.reply(Kind.WEIGHTS, meta=dict(reply.meta), tensors={"sum": words})


async def test_a_garbage_average_is_refused_and_the_client_keeps_its_weights(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    worker = _splitfed_client(deployment, GarbageSum(["sum"]))
    weights = parameters_to_vector(worker.bottom.parameters()).detach().clone()
    # Execute
    await worker.runner.after_epoch(0)
    # Assert: nothing loaded, the round counted as poisoned and reported
    assert torch.equal(parameters_to_vector(worker.bottom.parameters()), weights)
    assert worker.runner.report()["poisoned_rounds"] == 1
    assert worker.runner.extra_state()["poisoned_rounds"] == 1


def test_the_average_bound_is_validated(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="splitfed", clients=2)
    with pytest.raises(ConfigError, match=r"client\.max_average_ratio"):
        ClientWorker(
            load_client(files["client-1"], "client.max_average_ratio=0.5"),
            files["client-1"].parent,
            progress=False,
        )


class RandomWords:
    """client-3's masking keys, except that in ``bad_round`` it submits random words."""

    def __init__(self, keys: MaskingKeys, bad_round: int) -> None:
        self.keys, self.bad_round = keys, bad_round
        self.members = keys.members

    def masked(self, vector: torch.Tensor, round_: int, nonces: Any) -> Any:
        words = self.keys.masked(vector, round_, nonces)
        if round_ == self.bad_round:
            words = torch.randint(-(2**62), 2**62, (len(words),), dtype=torch.int64).numpy()
        return words


async def test_a_member_submitting_random_words_poisons_no_honest_client(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: three clients, three rounds; client-3 sends random words in round 1
    files = deployment(topology="splitfed", clients=3, dataset="breast_cancer", epochs=3)
    base = files["server"].parent
    clients = [
        ClientWorker(load_client(files[f"client-{i}"]), base, progress=False) for i in (1, 2, 3)
    ]
    clients[2].runner.keys = RandomWords(clients[2].runner.keys, bad_round=1)  # type: ignore[attr-defined]
    async with serving(files):
        # Execute
        summaries = await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 150)
    # Assert: every client finishes; round 1 (only) was refused by everyone; weights sane
    assert [s["poisoned_rounds"] for s in summaries] == [1, 1, 1]
    assert all(s["test_accuracy"] is not None and s["test_accuracy"] > 0.8 for s in summaries)
    for client in clients:
        weights = parameters_to_vector(client.bottom.parameters()).detach()
        assert weights.isfinite().all() and float(weights.abs().max()) < 100
    # rounds 0 and 2 were honest: after round 2 the honest segments are equal again
    a, b, c = (parameters_to_vector(w.bottom.parameters()).detach() for w in clients)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


# ---- B4: the session keeps to the configured frame limit --------------------------------------
@pytest.mark.parametrize("insecure", [False, True], ids=["noise", "plain"])
def test_sessions_take_the_configured_frame_limit(insecure: bool) -> None:
    # Prepare: both sides of a handshake told limits.max_frames = 4 (the default is 32;
    # a session built without it would allow 1024)
    server_keys, client_keys = generate_keypair(), generate_keypair()
    client = ClientHandshake(
        {"client": "c"},
        None if insecure else client_keys,
        None if insecure else server_keys.public,
        max_frames=4,
    )
    server = ServerHandshake(
        None if insecure else server_keys, lambda key: True, insecure=insecure, max_frames=4
    )
    # Execute
    reply, server_session, _, _ = server.answer(client.start(), lambda hello, key: {})
    client_session, _ = client.finish(reply)
    # Assert: four buffers pass, five are refused on both sides, sending and receiving
    assert server_session.open(client_session.seal([b"x"] * 4)) == [b"x"] * 4
    for session in (client_session, server_session):
        with pytest.raises(LimitError, match=r"allowed 1\.\.4"):
            session.seal([b"x"] * 5)
    frames = client_session.seal([b"x"] * 4)
    with pytest.raises(LimitError, match="the limit is 5"):
        server_session.open([*frames, b"x"])


async def test_a_server_session_refuses_frames_over_the_configured_limit(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server told limits.max_frames = 4; a peer whose session allows more
    files = deployment(clients=1, dataset="breast_cancer")
    base = files["server"].parent
    async with serving(files, "limits.max_frames=4") as (server, ctx, task):
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        # Execute: six sealed buffers (seven frames with the envelope)
        await send_raw(conn, header(), *[b"x"] * 5)
        # Assert: the listener's cap follows the limit (envelope + 4 frames): it closed the
        # connection at the sixth frame's header, before reading it; the server serves a new
        # session (a session allowing 5 frames refuses more too: test_crypto's frame tests)
        with pytest.raises(TransportError, match="lost"):
            await conn.recv(10)
        assert server.metrics.rejected_messages_total.labels(reason="oversized")._value.get() == 1
        conn.close()
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        await assert_serving(conn, task)
        conn.close()
    client = ClientWorker(
        load_client(files["client-1"], "limits.max_frames=7"), base, progress=False
    )
    assert client.handshake.max_frames == 7


# ---- B6: a batch over the server's cap is refused before any work ---------------------------
@pytest.mark.parametrize(
    ("overrides", "cap"), [((), 256), (("server.max_batch=8",), 8)], ids=["default", "set"]
)
def test_a_forward_over_the_batch_cap_is_refused_before_any_work(
    deployment, overrides: tuple[str, ...], cap: int
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: train.batch_size is 32; the default cap is the client's evaluation batch
    files = deployment(clients=1, dataset="breast_cancer")
    engine = server_engine(load_server(files["server"], *overrides), files["server"].parent)
    width = next(engine.model.parameters()).shape[1]

    def forward(batch: int, kind: Kind = Kind.FORWARD) -> Message:
        tensors = {
            "act": torch.randn(batch, width),
            "labels": torch.zeros(batch, dtype=torch.int64),
        }
        return Message(kind=kind, client="c", tensors=tensors)

    # Execute / Assert: one over the cap is refused (train and evaluate), the cap passes
    for kind in (Kind.FORWARD, Kind.EVALUATE):
        with pytest.raises(ProtocolError, match=rf"batch of {cap + 1} samples.*server\.max_batch"):
            if kind is Kind.FORWARD:
                engine.handle(b"c", forward(cap + 1))
            else:
                engine.evaluate(b"c", forward(cap + 1, kind))
    assert engine.steps_applied == 0
    ((_, reply),) = engine.handle(b"c", forward(cap))
    assert reply.kind is Kind.BACKWARD and engine.steps_applied == 1


def test_a_batch_cap_below_one_is_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer")
    with pytest.raises(ConfigError, match=r"server\.max_batch"):
        server_engine(load_server(files["server"], "server.max_batch=-1"), files["server"].parent)


# ---- B5: unfinished chunked messages hold bounded memory, for a bounded time -----------------
def _table(peer_timeout_s: float = 60.0) -> PeerTable:
    listen = Listen("tcp://127.0.0.1:1", "", "", True, 8, peer_timeout_s, "server")
    return PeerTable(listen, "server", "fp", {})


def test_the_peer_table_finds_the_biggest_assembly_over_budget_and_stalled_ones() -> None:
    # Prepare
    table = _table(peer_timeout_s=60.0)
    for name in ("a", "b", "c"):
        table.add(name.encode(), Peer(name, Channel(None), "k", last_seen=0.0, confirmed=True))  # type: ignore[arg-type]
    # Execute: b trickles parts in for 100 s, a sends 3 MiB at once, c is quiet
    table.peers[b"a"].partial(3 * 2**20, now=1.0)
    for t in range(1, 101):
        table.peers[b"b"].partial(1000, now=float(t))
        table.peers[b"b"].last_seen = float(t)
    table.peers[b"c"].last_seen = 100.0
    # Assert: over a 2 MiB budget the biggest holder goes; b's assembly is as old as its
    # first part, however recent its last one
    assert table.over_budget(4 * 2**20) is None
    assert table.over_budget(2 * 2**20) == b"a"
    assert sorted(i for i, _ in table.silent(100.0)) == [b"a", b"b"]
    assert table.peers[b"b"].whole() == 100_000 and table.peers[b"b"].partial_since is None
    assert table.silent(100.0) == [(b"a", 99.0)]


async def test_a_peer_pinning_unfinished_chunked_messages_loses_its_session(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server that lets unfinished chunked messages hold 1 MiB in all
    files = deployment(clients=1, dataset="breast_cancer")
    base = files["server"].parent
    async with serving(files, "limits.max_inflight_bytes=1048576") as (server, ctx, task):
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        assert conn.channel is not None
        # Execute: the head and two of the four 1 MiB chunks of a 4 MiB message, no more
        parts = list(conn.channel.session.seal_parts([b"{}", bytes(4 * 2**20)]))
        assert len(parts) == 6
        for part in parts[:3]:
            await conn.sock.send_multipart(part, copy=False)
        # Assert: refused with "overloaded" and the session is gone (its buffers with it)
        error = await assert_refused(conn)
        assert error.remote_code == "overloaded"
        await wait_until(lambda: not server.peers)
        samples = server.metrics.registry.get_sample_value(
            "sl_bound_hits_total", {"table": "inflight_bytes"}
        )
        assert samples == 1.0
        conn.close()
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        await assert_serving(conn, task)
        conn.close()


async def test_a_name_assembles_one_chunked_message_at_a_time(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two sessions of client-1, each beginning a 4 MiB chunked message
    files = deployment(clients=1, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    message = [b"{}", bytes(4 * 2**20)]
    async with serving(files) as (server, ctx, task):
        sessions = []
        for _ in range(2):
            conn = await join(server.cfg.server.bind, server.fingerprint, keys, ctx)
            assert conn.channel is not None
            sessions.append((conn, list(conn.channel.session.seal_parts(message))))
        (first, first_parts), (second, second_parts) = sessions

        def holding() -> list[int]:
            return sorted(p.partial_bytes for p in server.peers.values())

        # Execute: the first session's head and two chunks, then the second's
        for part in first_parts[:3]:
            await first.sock.send_multipart(part, copy=False)
        await wait_until(lambda: holding()[-1] > 2**20)
        assert len(server.peers) == 2 and holding()[0] == 0
        for part in second_parts[:3]:
            await second.sock.send_multipart(part, copy=False)
        # Assert: the first session (and its buffers) went when the second began
        await wait_until(lambda: len(server.peers) == 1 and holding()[0] > 2**20)
        for part in second_parts[3:]:  # the second message completes and is answered
            await second.sock.send_multipart(part, copy=False)
        await assert_refused(second)  # "{}" is no message: a protocol error reply
        await assert_serving(second, task)
        for conn, _ in sessions:
            conn.close()


async def test_a_relay_refuses_a_batch_over_its_cap(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a relay that takes at most 8 samples per message
    files = deployment(topology="multihop", clients=1, dataset="breast_cancer")
    base = files["server"].parent
    relay = RelayWorker(load(RelayConfig, files["relay-1"], ["relay.max_batch=8"]), base)
    width = build_segments(relay.cfg.model, "multihop")[0](
        torch.zeros(2, *relay.cfg.model.in_shape)
    ).shape[1]
    async with serving(files) as (_, ctx, _):
        stop = asyncio.Event()
        task = asyncio.create_task(relay.serve(stop))
        try:
            await wait_until(relay.ready)
            conn = await join(
                relay.cfg.relay.bind, relay.fingerprint, base / "keys", ctx, server="relay-1"
            )
            # Execute
            act, labels = torch.randn(9, width), torch.zeros(9, dtype=torch.int64)
            await conn.send(Message(kind=Kind.FORWARD, tensors={"act": act, "labels": labels}))
            # Assert: refused, naming the key; the relay serves on and applied nothing
            error = await assert_refused(conn)
            assert error.remote_code == "protocol" and "relay.max_batch" in str(error)
            await assert_serving(conn, task)
            assert relay.steps_applied == 0
            conn.close()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
