"""Hostile peers: nothing an admitted party, a replayed hello or a stranger sends can crash a
worker, exhaust it, or read another party's data (issue 15). One test per finding; the
authenticated fuzz test is in ``test_hostile_fuzz.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sl_pipeline.config import load
from sl_pipeline.errors import PeerError
from sl_pipeline.gate import TOKEN_BYTES, USERNAME
from sl_pipeline.handshake import HELLO, ClientHandshake
from sl_pipeline.keys import load_keypair, load_public_key, write_keypair
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.session import PlainSession
from sl_pipeline.transport import Channel, DealerConnection
from workers.client.worker import ClientWorker
from workers.ops.http import check_health, local_url
from workers.relay import RelayWorker
from workers.runtime.peers import Peer
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment

from .conftest import load_client, load_server
from .scrape import metrics_token

Served = tuple[ServerWorker, dict[str, Path], zmq.asyncio.Context, asyncio.Task[Any]]


@pytest.fixture
async def served(deployment) -> AsyncIterator[Served]:  # type: ignore[no-untyped-def]
    files = deployment(clients=2, dataset="breast_cancer", epochs=1)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        yield server, files, ctx, task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


def hello_for(fingerprint: str, name: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "client": name, "model": fingerprint, "role": "trainer"}


async def join(
    bind: str,
    fingerprint: str,
    keys: Path,
    ctx: zmq.asyncio.Context,
    name: str = "client-1",
    server: str = "server",
) -> DealerConnection:
    """An admitted client's connection, by hand (so the test can send anything on it)."""
    conn = DealerConnection(ctx, bind)
    hs = ClientHandshake(
        hello_for(fingerprint, name),
        load_keypair(keys / f"{name}.key"),
        load_public_key(keys / f"{server}.pub"),
    )
    await conn.handshake(hs, 5)
    return conn


def header(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": "forward",
        "re": None,
        "session": "",
        "client": "",
        "epoch": 0,
        "step": 0,
        "meta": {},
        "tensors": [],
    }
    base.update(changes)
    return base


async def send_raw(conn: DealerConnection, head: dict[str, Any] | bytes, *bufs: bytes) -> None:
    """Seal an arbitrary header and buffers with the session's real keys and send them."""
    assert conn.channel is not None
    blob = head if isinstance(head, bytes) else json.dumps(head).encode()
    await conn.sock.send_multipart(conn.channel.session.seal([blob, *bufs]))


async def assert_refused(conn: DealerConnection) -> PeerError:
    with pytest.raises(PeerError) as refused:
        await conn.recv(10)
    return refused.value


async def assert_serving(conn: DealerConnection, task: asyncio.Task[Any] | None = None) -> None:
    """The worker is alive and still answers this peer."""
    await conn.send(Message(kind=Kind.HEARTBEAT))
    reply = await conn.recv(10)
    assert reply.kind is Kind.HEARTBEAT
    if task is not None:
        assert not task.done()


def forward(act: torch.Tensor, step: int = 0, **tensors: torch.Tensor) -> Message:
    labels = torch.zeros(act.shape[0] if act.dim() else 1, dtype=torch.int64)
    return Message(kind=Kind.FORWARD, step=step, tensors={"act": act, "labels": labels, **tensors})


# ---- finding 1: one message must not kill a worker -------------------------------------------
HUGE = "9" * 5000


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(header()).replace('"epoch": 0', f'"epoch": {HUGE}').encode(),
        json.dumps(header(meta={"x": 1})).replace('"x": 1', f'"x": {HUGE}').encode(),
        b'{"meta": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    ],
    ids=["huge-int-epoch", "huge-int-meta", "deep-nesting"],
)
async def test_header_numbers_and_nesting_out_of_range_get_an_error_reply(
    served: Served, raw: bytes
) -> None:
    server, files, ctx, task = served
    conn = await join(
        server.cfg.server.bind, server.fingerprint, files["server"].parent / "keys", ctx
    )
    # Execute
    await send_raw(conn, raw)
    # Assert: refused as a protocol error, and the server still serves this very peer
    error = await assert_refused(conn)
    assert error.remote_code in ("protocol", "limit")
    await assert_serving(conn, task)
    conn.close()


@pytest.mark.parametrize(
    "shape", [[0, 2**64], [2**70], [0, -1], [0, 2**63]], ids=["0x2^64", "2^70", "neg", "0x2^63"]
)
async def test_tensor_shapes_out_of_range_get_an_error_reply(
    served: Served, shape: list[int]
) -> None:
    server, files, ctx, task = served
    conn = await join(
        server.cfg.server.bind, server.fingerprint, files["server"].parent / "keys", ctx
    )
    spec = {"name": "act", "dtype": "float32", "shape": shape}
    await send_raw(conn, header(tensors=[spec]), b"")
    error = await assert_refused(conn)
    assert error.remote_code in ("protocol", "limit")
    await assert_serving(conn, task)
    conn.close()


async def test_zero_dim_int8_activations_with_a_scale_get_an_error_reply(served: Served) -> None:
    server, files, ctx, task = served
    conn = await join(
        server.cfg.server.bind, server.fingerprint, files["server"].parent / "keys", ctx
    )
    act = torch.tensor(3, dtype=torch.int8)  # 0-d: len() of it raises TypeError
    await conn.send(forward(act, act_scale=torch.ones(1)))
    error = await assert_refused(conn)
    assert error.remote_code == "protocol"
    await assert_serving(conn, task)
    conn.close()


async def test_an_unexpected_failure_becomes_an_internal_error_reply(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last resort: a bug the codec and engines do not foresee still costs one reply."""
    server, files, ctx, task = served
    conn = await join(
        server.cfg.server.bind, server.fingerprint, files["server"].parent / "keys", ctx
    )

    def broken(identity: bytes, msg: Message) -> list[Any]:
        raise KeyError("a bug nobody foresaw")

    monkeypatch.setattr(server.engine, "handle", broken)
    await conn.send(forward(torch.randn(4, 64)))
    error = await assert_refused(conn)
    assert error.remote_code == "internal"
    monkeypatch.undo()
    await assert_serving(conn, task)
    samples = server.metrics.registry.get_sample_value(
        "sl_rejected_messages_total", {"reason": "internal"}
    )
    assert samples == 1.0
    conn.close()


async def _insecure_hello(bind: str, payload: bytes, ctx: zmq.asyncio.Context) -> list[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bind)
    try:
        await sock.send_multipart([HELLO, str(PROTOCOL_VERSION).encode(), b"plain", payload])
        return await asyncio.wait_for(sock.recv_multipart(), 10)
    finally:
        sock.close()


@pytest.mark.parametrize(
    "payload",
    [b'{"client": ' + HUGE.encode() + b"}", b"[" * 8000 + b"]" * 8000, b'{"client": [[[]]]}'],
    ids=["huge-int", "deep-nesting", "non-string-name"],
)
async def test_insecure_hello_out_of_range_is_refused(deployment, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer", insecure=True)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        reply = await _insecure_hello(server.cfg.server.bind, payload, ctx)
        assert reply[0] == b"sl-refuse"
        ok = json.dumps(hello_for(server.fingerprint, "client-1")).encode()
        reply = await _insecure_hello(server.cfg.server.bind, ok, ctx)
        assert reply[0] == b"sl-welcome" and not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


async def test_a_relay_survives_the_crash_triggers(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="multihop", clients=1, dataset="breast_cancer")
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"]), base)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(server.serve(stop))]
    ctx = zmq.asyncio.Context()
    try:
        from sl_pipeline.config import RelayConfig

        relay = RelayWorker(load(RelayConfig, files["relay-1"]), base)
        await _until(lambda: server.bound)
        tasks.append(asyncio.create_task(relay.serve(stop)))
        await _until(relay.ready)
        conn = await join(
            relay.cfg.relay.bind, relay.fingerprint, base / "keys", ctx, server="relay-1"
        )
        triggers: Sequence[tuple[dict[str, Any] | bytes, tuple[bytes, ...]]] = [
            (json.dumps(header()).replace('"step": 0', f'"step": {HUGE}').encode(), ()),
            (header(tensors=[{"name": "act", "dtype": "float32", "shape": [0, 2**64]}]), (b"",)),
        ]
        for head, bufs in triggers:
            await send_raw(conn, head, *bufs)
            await assert_refused(conn)
        await conn.send(forward(torch.tensor(3, dtype=torch.int8), act_scale=torch.ones(1)))
        await assert_refused(conn)
        await assert_serving(conn, tasks[1])
        conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        ctx.destroy(linger=0)


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for a worker"
        await asyncio.sleep(0.02)


# ---- finding 4: a replayed hello, with no key, changes nothing -------------------------------
async def send_as_stranger(
    bind: str, frames: list[Any], ctx: zmq.asyncio.Context, token: bytes | None = None
) -> list[bytes] | str:
    """Connect (with a gate token, if given), send ``frames``; the reply, or the name of
    the ZeroMQ handshake failure that closed the connection before anything was read."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    )
    if token is not None:
        sock.plain_username, sock.plain_password = USERNAME, token
    sock.connect(bind)
    # Not awaited alone: once the handshake fails libzmq may drop the pipe, and a send with
    # no pipe waits for ever; the refusal is what this waits for.
    sending = asyncio.ensure_future(sock.send_multipart(frames, copy=False))
    try:
        reply = asyncio.ensure_future(sock.recv_multipart())
        failed = asyncio.ensure_future(monitor.recv_multipart())
        done, pending = await asyncio.wait(
            {reply, failed}, timeout=30, return_when="FIRST_COMPLETED"
        )
        for future in (*pending, sending):
            future.cancel()
        assert done, "neither a reply nor a refused connection within 30 s"
        if reply in done:
            return list(reply.result())
        event = parse_monitor_message(failed.result())["event"]
        return "auth" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "protocol"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


async def test_a_replayed_hello_leaves_the_real_client_untouched(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: what the client achieves alone (u-shaped: the server holds an open step)
    make = dict(topology="ushaped", clients=1, dataset="breast_cancer", epochs=3)
    alone = (await run_deployment(deployment(**make))).summaries[0]
    files = deployment(**make)
    base = files["server"].parent
    _, insider_pub = write_keypair("insider", base / "keys")  # another admitted client
    (base / "keys" / "admitted" / insider_pub.name).write_bytes(insider_pub.read_bytes())
    project = 'server.groups={project=["client-1", "insider"]}'  # it may train beside client-1
    server = ServerWorker(load_server(files["server"], "server.max_clients=4", project), base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await _until(lambda: server.bound)
        client = ClientWorker(load_client(files["client-1"]), base, progress=False)
        captured: list[Any] = []  # what an on-path observer sees: gate token and hello
        start, token = client.handshake.start, client.handshake.connect_token

        def recording() -> list[bytes]:
            captured.append(start())
            return captured[-1]  # type: ignore[no-any-return]

        def recording_token(now_s: float) -> bytes | None:
            captured.append(token(now_s))
            return captured[-1]  # type: ignore[no-any-return]

        client.handshake.start = recording  # type: ignore[method-assign]
        client.handshake.connect_token = recording_token  # type: ignore[method-assign]
        training = asyncio.create_task(client.run())
        await _until(lambda: server.steps_applied >= 2)
        # Execute: the captured hello, replayed from many connections while the client
        # trains: with the captured token, and through connections another admitted
        # client (insider) opens with tokens of its own
        bind, (old_token, hello) = server.cfg.server.bind, captured[:2]
        insider = ClientHandshake({}, load_keypair(base / "keys" / "insider.key"), None)
        insider.server_key = load_public_key(base / "keys" / "server.pub")

        def fresh() -> bytes | None:
            return insider.connect_token(time.time())

        answers = await asyncio.gather(
            *(send_as_stranger(bind, hello, ctx, old_token) for _ in range(20)),
            *(
                send_as_stranger(bind, hello, ctx, insider.connect_token(time.time()))
                for _ in range(20)
            ),
        )
        summary = await asyncio.wait_for(training, 120)
        # Assert: every replay refused, and the client's run is the one it has alone
        # (the insider's key holds 4 connections at once, gate.MAX_CONNECTIONS_PER_KEY: the
        # rest of its 20 are refused in the ZMTP handshake, as a stranger's)
        assert answers[:20] == ["auth"] * 20
        refused = [answer for answer in answers[20:] if answer != "auth"]
        assert refused and all(answer[0] == b"sl-refuse" for answer in refused)
        assert all(b"replayed hello" in answer[1] for answer in refused)
        assert summary["steps"] == alone["steps"]
        assert summary["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=0.02)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


def test_an_unconfirmed_session_owns_no_engine_state(deployment) -> None:  # type: ignore[no-untyped-def]
    """Sans-IO view of the same rule: dropping a never-confirmed session of a name (timeout
    or eviction) must not clear that name's live step in the engine."""
    files = deployment(topology="ushaped", clients=1, dataset="breast_cancer")
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    forgotten: list[str] = []
    server.forget_peer = lambda peer: forgotten.append(peer.name)  # type: ignore[method-assign]
    live = Peer("client-1", Channel(PlainSession()), "k", confirmed=True)
    replayed = Peer("client-1", Channel(PlainSession()), "k")
    server.peers = {b"live": live, b"replayed": replayed}
    server.forget(b"replayed")
    assert forgotten == [] and b"live" in server.peers
    server.forget(b"live")
    assert forgotten == ["client-1"]


# ---- finding 3: sub-names only from relays, every per-name table bounded ---------------------
def _act_forward(client: str, step: int = 0, labels: bool = True) -> Message:
    tensors = {"act": torch.randn(4, 64)}
    if labels:
        tensors["labels"] = torch.zeros(4, dtype=torch.int64)
    return Message(kind=Kind.FORWARD, client=client, step=step, tensors=tensors)


async def test_a_client_cannot_open_state_under_a_sub_name(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: u-shaped, where an open step blocks every other client's forward
    files = deployment(topology="ushaped", clients=2, dataset="breast_cancer")
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"]), base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await _until(lambda: server.bound)
        keys, bind = base / "keys", server.cfg.server.bind
        mallory = await join(bind, server.fingerprint, keys, ctx, "client-1")
        honest = await join(bind, server.fingerprint, keys, ctx, "client-2")
        # Execute: a step opened under a self-chosen sub-name, then bye
        await mallory.send(_act_forward("x", labels=False))
        opened = await mallory.recv(10)
        await mallory.send(Message(kind=Kind.BYE, client="x"))
        # Assert: the step was the client's own, so its bye closed it; nobody is blocked
        assert opened.client == "client-1"
        await honest.send(_act_forward("client-2", labels=False))
        reply = await honest.recv(10)
        assert reply.kind is Kind.RESULT and reply.client == "client-2"
        mallory.close()
        honest.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


async def test_the_reply_cache_is_bounded_in_names_and_counts_the_hits(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 configured as a relay (it may speak for others); room for 3 names
    files = deployment(clients=1, dataset="breast_cancer")
    base = files["server"].parent
    cfg = load_server(files["server"], 'server.relays=["client-1"]', "server.max_names=3")
    server = ServerWorker(cfg, base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await _until(lambda: server.bound)
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        # Execute: forwards under 10 distinct sub-names
        codes = []
        for i in range(10):
            await conn.send(_act_forward(f"sub-{i}"))
            try:
                codes.append((await conn.recv(10)).kind.value)
            except PeerError as exc:
                codes.append(exc.remote_code)
        # Assert: 3 names kept; the run takes no more names than it remembers replies for
        # (before: all 10 trained, 7 evictions from the cache, the run's names unbounded)
        (run,) = server.book.runs.values()  # one training run; its reply cache
        assert run.replies.names() == 3 and len(run.members) == 3
        assert codes == ["backward"] * 3 + ["limit"] * 7
        conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


async def test_a_relay_keeps_sub_names_of_configured_relays_only_and_bounds_its_cache(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    from sl_pipeline.config import RelayConfig

    files = deployment(topology="multihop", clients=1, dataset="breast_cancer")
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"]), base)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(server.serve(stop))]
    ctx = zmq.asyncio.Context()
    try:
        relay_cfg = load(RelayConfig, files["relay-1"], ["relay.max_names=2"])
        relay = RelayWorker(relay_cfg, base)
        await _until(lambda: server.bound)
        tasks.append(asyncio.create_task(relay.serve(stop)))
        await _until(relay.ready)
        conn = await join(
            relay.cfg.relay.bind, relay.fingerprint, base / "keys", ctx, server="relay-1"
        )
        act = torch.randn(4, 64)
        for i in range(3):  # a plain client's sub-names are ignored: one name, one entry
            await conn.send(dataclasses.replace(forward(act, step=i), client=f"x{i}"))
            assert (await conn.recv(10)).client == "client-1"
        assert relay.replies.names() == 1
        relay.listen = dataclasses.replace(relay.listen, relays=frozenset({"client-1"}))
        for i in range(4):  # a configured relay's sub-names: bounded at 2
            await conn.send(dataclasses.replace(forward(act, step=i), client=f"y{i}"))
            assert (await conn.recv(10)).client == f"client-1/y{i}"
        assert relay.replies.names() == 2
        hits = relay.metrics.registry.get_sample_value(
            "sl_bound_hits_total", {"table": "relay_cache"}
        )
        assert hits == 3.0
        conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        ctx.destroy(linger=0)


# ---- finding 5: a stranger's message costs the server no memory ------------------------------
MIB = 1024 * 1024
FRAME_MIB = int(os.environ.get("SL_PREAUTH_FRAME_MIB", "16"))  # the figure: 100


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


async def _ready(listen: str, proc: Any) -> None:
    url = local_url(listen)
    for _ in range(600):
        assert proc.poll() is None, "the server exited"
        if await check_health(url, 1.0):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the server never became ready")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_a_strangers_huge_message_costs_the_server_no_memory(deployment, procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a real server process, its resident memory once it is ready
    files = deployment(clients=1, dataset="breast_cancer", ops=True)
    cfg = load_server(files["server"])
    # forked (tests/workerproc.py): a torch import less; its memory is under test, not its start
    proc = procs.fork("server", files["server"])
    await _ready(cfg.ops.listen, proc)
    before = _status_kib(proc.pid, "VmRSS") * 1024
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    frame = bytes(FRAME_MIB * MIB)
    message = [b"\x00" * 16, *[frame] * 12]  # 12 frames: 12 x FRAME_MIB MiB, no key
    ctx = zmq.asyncio.Context()
    try:
        # Execute: with no key at all, and with a forged gate token
        keyless = await send_as_stranger(cfg.server.bind, message, ctx)
        forged = await send_as_stranger(cfg.server.bind, message, ctx, os.urandom(TOKEN_BYTES))
        # Assert: both refused while connecting; the peak and the resident size stay put
        peak = _status_kib(proc.pid, "VmHWM") * 1024
        after = _status_kib(proc.pid, "VmRSS") * 1024
        print(f"server RSS {before / MIB:.0f} MiB -> peak {peak / MIB:.0f} -> {after / MIB:.0f}")
        assert (keyless, forged) == ("protocol", "auth")
        assert peak - before <= 64 * MIB and after - before <= 64 * MIB
        await _ready(cfg.ops.listen, proc)
    finally:
        ctx.destroy(linger=0)


# ---- finding 7: /status names nobody without the token; refusals carry no fingerprint --------
async def test_status_redacts_peers_unless_asked_with_the_token(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer", ops=True)
    base = files["server"].parent
    inline = 'ops.status_token="s3cret-status-token"'
    cfg = load_server(files["server"], inline, 'ops.status_token_file=""')
    server = ServerWorker(cfg, base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await _until(lambda: server.bound)
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        await assert_serving(conn)  # confirmed: a peer now
        url = f"{local_url(server.cfg.ops.listen)}/status"
        async with aiohttp.ClientSession() as http:
            answers = []
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Bearer {metrics_token(base)}"},
                {"Authorization": "Bearer s3cret-status-token"},
            ):
                async with http.get(url, headers=headers) as response:
                    answers.append((response.status, await response.text()))
        fp = server.peers[next(iter(server.peers))].key
        for status, text in answers[:2]:  # anyone who reaches the port: the role alone
            assert status == 200 and set(json.loads(text)) == {"role", "redacted"}, text
        status, text = answers[2]  # Prometheus's token: a count, no names
        body = json.loads(text)
        assert status == 200 and body["peers"] == 1 and "session" not in body
        assert "client-1" not in text and fp not in text
        full = json.loads(answers[3][1])
        assert full["peers"][0]["name"] == "client-1" and full["peers"][0]["key"] == fp
        conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)


def test_redacted_status_hides_run_ids_that_clients_chose() -> None:
    from workers.ops.http import redact

    runs = [
        {"id": "run-3", "clients": ["client-1"], "accuracies": {"client-1": 0.9}, "steps": 4},
        {"id": "hospital-a-trial", "clients": ["a", "b"], "finished_clients": ["a"]},
    ]
    text = json.dumps(redact({"runs": runs, "peers": [{"name": "a"}]}))
    body = json.loads(text)
    assert [r["id"] for r in body["runs"]] == ["run-3", "#2"]
    assert body["runs"][0]["clients"] == 1 and body["runs"][1]["finished_clients"] == 1
    assert "hospital" not in text and "client-1" not in text and body["runs"][0]["steps"] == 4


def test_the_not_admitted_refusal_carries_no_fingerprint() -> None:
    from sl_pipeline.crypto import Initiator, Responder
    from sl_pipeline.errors import NotAdmittedError
    from sl_pipeline.handshake import refusal
    from sl_pipeline.keys import fingerprint, generate_keypair

    server, stranger = generate_keypair(), generate_keypair()
    message1 = Initiator(stranger, server.public).write_message1(b"{}")
    with pytest.raises(NotAdmittedError) as refused:
        Responder(server, lambda key: False).read_message1(message1)
    frames = refusal(refused.value)
    assert fingerprint(stranger.public).encode() not in b"".join(frames)
