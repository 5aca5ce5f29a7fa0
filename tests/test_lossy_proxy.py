"""The fault-injection proxy: whole messages only, in order, counted, and stopped fast."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.errors import ConfigError, ReplayError
from sl_pipeline.gate import MAX_CONNECTIONS_PER_KEY
from sl_pipeline.handshake import ClientHandshake, ServerHandshake
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.transport import Channel, DealerConnection, frame_buffers
from sl_pipeline.zmtp_router import ZmtpRouter
from tests.lossy_proxy import LossyProxy

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


class Echo:
    """An upstream ROUTER that checks each message is whole and echoes it back."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received = 0
        self.partial = 0
        self.peers: set[bytes] = set()
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        for _ in range(100_000):
            identity, *frames = await self.sock.recv_multipart()
            self.received += 1
            self.peers.add(identity)
            self.partial += not whole(frames)
            await self.sock.send_multipart([identity, *frames])

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close(linger=0)


def message(client: int, seq: int) -> list[bytes]:
    """1-5 frames; each names (client, seq, index, count) so a partial message shows."""
    count = 1 + (seq * 7 + client) % 5
    return [
        f"{client}:{seq}:{i}:{count}:".encode() + bytes([seq % 256]) * (i * 97)
        for i in range(count)
    ]


def whole(frames: list[bytes]) -> bool:
    try:
        client, seq = (int(x) for x in frames[0].split(b":")[:2])
    except ValueError:
        return False
    return frames == message(client, seq)


class Rig:
    """One context, one echo server; tracks every proxy and socket and closes them."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.echo = Echo(self.ctx)
        self.proxies: list[LossyProxy] = []
        self.socks: list[Any] = []
        self.closers: list[Any] = []  # close() of listeners that are not ZeroMQ sockets

    async def proxy(self, **kwargs: Any) -> LossyProxy:
        proxy = LossyProxy(self.echo.endpoint, **kwargs)
        self.proxies.append(proxy)
        await proxy.start()
        return proxy

    def dealer(self, endpoint: str) -> Any:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        self.socks.append(sock)
        return sock

    async def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        for close in self.closers:
            close()
        for proxy in self.proxies:
            await proxy.stop()
        await self.echo.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        await r.close()


async def round_trips(rig: Rig, endpoint: str, client: int, n: int) -> list[int]:
    sock = rig.dealer(endpoint)
    seen = []
    for seq in range(n):
        await sock.send_multipart(message(client, seq))
        reply = await asyncio.wait_for(sock.recv_multipart(), 5.0)
        assert reply == message(client, seq)
        seen.append(seq)
    return seen


async def test_lossless_round_trips_for_three_clients(rig: Rig) -> None:
    # Prepare
    proxy = await rig.proxy()
    # Execute
    results = await asyncio.gather(*(round_trips(rig, proxy.endpoint, c, 200) for c in range(3)))
    # Assert
    assert results == [list(range(200))] * 3
    assert proxy.forwarded == 1200 and proxy.dropped == 0
    assert len(rig.echo.peers) == 3 and proxy.links == 3
    assert rig.echo.partial == 0


async def test_delays_preserve_per_connection_order(rig: Rig) -> None:
    proxy = await rig.proxy(delay_s=(0.0, 0.004), seed=3)
    socks = [rig.dealer(proxy.endpoint) for _ in range(2)]
    started = time.monotonic()
    for seq in range(60):
        for c, sock in enumerate(socks):
            await sock.send_multipart(message(c, seq))
    for c, sock in enumerate(socks):
        got = [await asyncio.wait_for(sock.recv_multipart(), 5.0) for _ in range(60)]
        assert got == [message(c, seq) for seq in range(60)]
    assert time.monotonic() - started > 0.004  # the delays were applied


async def wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the proxy"
        await asyncio.sleep(0.01)


async def drain(sock: Any, quiet_s: float = 0.3, limit: int = 10_000) -> list[list[bytes]]:
    got: list[list[bytes]] = []
    for _ in range(limit):
        try:
            got.append(await asyncio.wait_for(sock.recv_multipart(), quiet_s))
        except TimeoutError:
            break
    return got


async def test_drops_are_whole_messages_and_counted(rig: Rig) -> None:
    # Prepare
    clients, n, echo = 3, 150, rig.echo
    proxy = await rig.proxy(drop_rate=0.3, seed=1234, delay_s=(0.0, 0.001))
    socks = [rig.dealer(proxy.endpoint) for _ in range(clients)]
    # Execute: pipelined sends (a lost reply must not stall the test)
    for seq in range(n):
        for c, sock in enumerate(socks):
            await sock.send_multipart(message(c, seq))
    await wait_until(
        lambda: (
            proxy.received == clients * n + echo.received
            and proxy.received == proxy.forwarded + proxy.dropped
        )
    )
    replies = await asyncio.gather(*(drain(sock) for sock in socks))
    # Assert: every message accounted for, none partial, order kept
    assert proxy.forwarded_up + proxy.dropped_up == clients * n
    assert echo.received == proxy.forwarded_up
    assert proxy.forwarded_down + proxy.dropped_down == echo.received
    assert sum(map(len, replies)) == proxy.forwarded_down
    assert proxy.forwarded + proxy.dropped == clients * n + echo.received
    assert echo.partial == 0
    for c, got in enumerate(replies):
        assert all(whole(frames) for frames in got)
        seqs = [int(frames[0].split(b":")[1]) for frames in got]
        assert seqs == sorted(seqs) and all(int(f[0].split(b":")[0]) == c for f in got)
    assert 0.2 < proxy.dropped_up / (clients * n) < 0.4
    assert proxy.dropped_down > 0


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
async def test_drop_direction(rig: Rig, direction: str) -> None:
    proxy = await rig.proxy(drop_rate=1.0, drop_direction=direction)
    sock = rig.dealer(proxy.endpoint)
    for seq in range(10):
        await sock.send_multipart(message(0, seq))
    await wait_until(lambda: proxy.dropped == 10)
    assert await drain(sock, 0.2) == []
    expected = (10, 0, 0) if direction == "upstream" else (0, 10, 10)
    assert (proxy.dropped_up, proxy.dropped_down, rig.echo.received) == expected


async def test_spare_handshakes(rig: Rig) -> None:
    proxy = await rig.proxy(drop_rate=1.0, spare_handshakes=True)
    sock = rig.dealer(proxy.endpoint)
    await sock.send_multipart([b"sl-hello", b"1", b"plain", b"{}"])
    await sock.send_multipart([b"\x00" * 16, b"sealed"])
    await wait_until(lambda: proxy.forwarded + proxy.dropped == 3)
    assert await drain(sock, 0.3) == [[b"sl-hello", b"1", b"plain", b"{}"]]
    assert (proxy.forwarded, proxy.dropped) == (2, 1)


async def test_stop_is_fast_and_frees_the_port(rig: Rig) -> None:
    # Prepare: links with messages still waiting in long delays; one link evicted
    proxy = await rig.proxy(delay_s=(5.0, 10.0), max_links=2)
    endpoint = proxy.endpoint
    for c in range(3):
        await rig.dealer(endpoint).send_multipart(message(c, 0))
    await wait_until(lambda: proxy.received == 3)
    assert proxy.links == 2  # the least recently used link was evicted
    # Execute
    started = time.monotonic()
    await proxy.stop()
    # Assert
    assert time.monotonic() - started < 1.0
    assert proxy.links == 0 and rig.echo.received == 0
    probe = rig.ctx.socket(zmq.ROUTER)
    probe.bind(endpoint)  # the port is free again
    probe.close(linger=0)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("lossy")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drop_rate": 1.5},
        {"delay_s": (0.2, 0.1)},
        {"drop_direction": "sideways"},
        {"max_messages": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LossyProxy("tcp://127.0.0.1:1", **kwargs)


async def test_command_line(rig: Rig) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.lossy_proxy",
        "--upstream",
        rig.echo.endpoint,
        "--drop",
        "0",
        "--delay",
        "0,0.001",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        endpoint = (await asyncio.wait_for(proc.stdout.readline(), 20.0)).decode().strip()
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert await round_trips(rig, endpoint, 0, 5) == list(range(5))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        counters = json.loads(await asyncio.wait_for(proc.stdout.readline(), 5.0))
        assert counters["forwarded"] == 10 and counters["dropped"] == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_dropped_sealed_message_leaves_a_gap_the_server_rejects(rig: Rig) -> None:
    """The interplay docs/reliability.md describes: loss shows up as a counter gap, and
    only a new handshake (a new session) recovers."""
    # Prepare: a real (insecure, but counter-checked) session through the proxy
    server = await ZmtpRouter.bind("tcp://127.0.0.1:*", DEFAULT_LIMITS)
    rig.closers.append(server.close)
    proxy = LossyProxy(server.endpoint)
    rig.proxies.append(proxy)
    await proxy.start()
    hs_server = ServerHandshake(None, lambda key: True, insecure=True)
    hello = {"v": PROTOCOL_VERSION, "client": "c1", "model": "m", "role": "train"}

    async def join() -> tuple[DealerConnection, Channel]:
        conn = DealerConnection(rig.ctx, proxy.endpoint)
        rig.socks.append(conn.sock)
        task = asyncio.create_task(conn.handshake(ClientHandshake(hello, None, None), 5.0))
        identity, frames = await asyncio.wait_for(server.recv(), 5.0)
        reply, session, _, _ = hs_server.answer(frame_buffers(frames), lambda h, k: {})
        await server.send(identity, reply)
        await task
        return conn, Channel(session)

    async def server_opens() -> Message:
        _, frames = await asyncio.wait_for(server.recv(), 5.0)
        return channel.unpack(frame_buffers(frames))

    conn, channel = await join()
    step = [Message(kind=Kind.HEARTBEAT, client="c1", step=i) for i in range(3)]
    # Execute / Assert
    await conn.send(step[0])
    assert (await server_opens()).step == 0
    proxy.drop_next("upstream")
    await conn.send(step[1])  # lost
    await conn.send(step[2])
    with pytest.raises(ReplayError):
        await server_opens()  # counter 2 where 1 was expected
    conn, channel = await join()  # recovery: a new session, resend the same step
    await conn.send(step[1])
    assert (await server_opens()).step == 1
    assert proxy.dropped == 1 and proxy.links == 2


@contextlib.asynccontextmanager
async def training(
    deployment: Any, epochs: int, timeout_s: float = 0.5, **proxy_kwargs: Any
) -> AsyncIterator[Any]:
    """A real server, a LossyProxy in front of it and a client (not yet running) with
    short timeouts; yields (server, proxy, client) and stops everything."""
    from tests.conftest import load_client, load_server
    from workers.client.worker import ClientWorker
    from workers.server.worker import ServerWorker

    files = deployment(clients=1, dataset="breast_cancer", epochs=epochs)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(stop))
    # The proxy cannot see a client's connection close: it keeps the link until evicted. The
    # server admits 4 connections per key at once, so it keeps 3 (this client's last ones)
    proxy_kwargs.setdefault("max_links", MAX_CONNECTIONS_PER_KEY - 1)
    proxy = LossyProxy(server.cfg.server.bind, keyed=True, **proxy_kwargs)
    await proxy.start()
    overrides = [
        f"client.server={proxy.endpoint}",
        f"client.timeout_s={timeout_s}",
        "client.connect_timeout_s=0.5",
    ]
    client = ClientWorker(
        load_client(files["client-1"], *overrides), files["client-1"].parent, progress=False
    )
    try:
        yield server, proxy, client
    finally:
        await proxy.stop()
        stop.set()
        await asyncio.wait_for(serving, 10.0)


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
async def test_lost_message_is_applied_exactly_once(
    deployment: Any, caplog: pytest.LogCaptureFixture, direction: str
) -> None:
    """Drop one message mid-training: the client times out, rejoins and resends the same
    step; a lost reply is answered from the server's per-client cache."""
    # A reply later than client.timeout_s would also be answered from the cache: leave room
    # for a loaded machine so that only the dropped message causes a resend.
    async with training(deployment, epochs=1, timeout_s=2.0) as (server, proxy, client):
        running = asyncio.create_task(client.run())
        await wait_until(lambda: client.steps_done >= 3, 30.0)
        # Execute: the next message this way (a FORWARD or its reply) is lost
        proxy.drop_next(direction)
        with caplog.at_level(logging.INFO, logger="sl_pipeline.server"):
            summary = await asyncio.wait_for(running, 60.0)
        # Assert
        assert proxy.dropped == 1 and summary["retries"] >= 1
        assert server.steps_applied == summary["steps"]
        assert ("answering from cache" in caplog.text) == (direction == "downstream")


async def test_training_under_random_loss_applies_each_step_once(deployment: Any) -> None:
    async with training(deployment, epochs=2, drop_rate=0.1, seed=3) as (server, proxy, client):
        summary = await asyncio.wait_for(client.run(), 120.0)
        assert proxy.dropped_up > 0 and proxy.dropped_down > 0
        assert summary["steps"] > 0 and server.steps_applied == summary["steps"]


async def test_the_command_lines_keyed_proxy_survives_more_rejoins_than_a_key_may_hold(
    deployment: Any,
) -> None:
    """docs/reliability.md's lossy run: `python -m tests.lossy_proxy --keyed` in front of a
    keyed server. The proxy cannot see a client's old connection close, and the server admits
    MAX_CONNECTIONS_PER_KEY at once, so the command line must let old links go by itself."""
    from tests.conftest import load_client, load_server
    from workers.client.worker import ClientWorker
    from workers.server.worker import ServerWorker

    # Prepare: a real keyed server, the proxy as a process, a client with short waits
    files = deployment(clients=1, dataset="breast_cancer", epochs=2)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(stop))
    argv = ["--keyed", "--upstream", server.cfg.server.bind, "--drop", "0.1", "--seed", "3"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.lossy_proxy", *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        endpoint = (await asyncio.wait_for(proc.stdout.readline(), 20.0)).decode().strip()
        overrides = [f"client.server={endpoint}", "client.timeout_s=0.5"]
        overrides += ["client.connect_timeout_s=0.5", "client.retry_for_s=5"]
        client = ClientWorker(
            load_client(files["client-1"], *overrides), files["client-1"].parent, progress=False
        )
        # Execute
        summary = await asyncio.wait_for(client.run(), 50.0)
        # Assert: more rejoins than one key may hold connections, and every step applied once
        assert summary["retries"] > MAX_CONNECTIONS_PER_KEY
        assert server.steps_applied == summary["steps"] > 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        stop.set()
        await asyncio.wait_for(serving, 10.0)
