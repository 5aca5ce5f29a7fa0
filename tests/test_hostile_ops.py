"""Hostile HTTP requests to a worker's ops port (``/status``, the server's run API): anyone
who reaches the port gets a refusal, never a 500 with a traceback in the worker's log
(issue 15, the fourth red team). Raw requests over a loopback socket, as an attacker writes
them (an HTTP client library would refuse to send these headers)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from workers.ops.http import OpsServer
from workers.ops.httpguard import MAX_CONNECTIONS, RATE, SCRAPE_COST, AcceptRate, GuardedSite
from workers.ops.metrics import WorkerMetrics
from workers.server.runs_api import RunApi

TIMEOUT_S = 5.0
MIB = 1 << 20


class _NoRuns:
    """The run API's view of a server with no run: a guard that lets a request through
    would answer it from here."""

    class book:
        runs: dict[str, Any] = {}

        @staticmethod
        def latest(group: str | None = None) -> None:
            return None


@pytest.fixture
async def ops() -> AsyncIterator[OpsServer]:
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    status = {"role": "server", "peers": [{"name": "client-1", "key": "ab"}]}
    routes = RunApi(_NoRuns(), "admin-secret").add_routes  # type: ignore[arg-type]
    server = OpsServer(metrics, lambda: status, lambda: True, "127.0.0.1", 0, routes, "tok")
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


async def raw_get(port: int, path: str, authorization: bytes) -> tuple[int, bytes]:
    """One request with an ``Authorization`` header of exactly these bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + authorization
            + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("token", [b"Bearer \xff\xfe", b"\xc3(", b"Bearer tok\x80"])
async def test_a_token_of_no_utf8_is_a_refusal_not_a_500(
    ops: OpsServer, token: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute: /status and the run API, each with a header whose bytes are no UTF-8
    with caplog.at_level(logging.ERROR):
        status, body = await raw_get(ops.port, "/status", token)
        runs, refusal = await raw_get(ops.port, "/runs", token)
    # Assert: the redacted status and a 401, and no traceback in the log
    assert status == 200 and json.loads(body)["peers"] == 1
    assert runs == 401 and json.loads(refusal) == {"error": "missing or wrong admin token"}
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    # the right tokens still open both
    status, body = await raw_get(ops.port, "/status", b"Bearer tok")
    assert json.loads(body)["peers"][0]["name"] == "client-1"
    runs, listing = await raw_get(ops.port, "/runs", b"Bearer admin-secret")
    assert runs == 200 and json.loads(listing) == {"runs": [], "current": None}


async def test_unparsable_requests_log_one_line_without_a_trace(
    ops: OpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute: five requests with a header over aiohttp's 8 KiB line limit
    with caplog.at_level(logging.WARNING):
        answers = [await raw_get(ops.port, "/status", b"x" * 20000) for _ in range(5)]
    # Assert: each refused (400), and one log line for the five, one line with no trace
    assert [status for status, _ in answers] == [400] * 5
    lines = [r for r in caplog.records if "request" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert not lines[0].exc_info and "\n" not in lines[0].getMessage()
    assert "LineTooLong" in lines[0].getMessage()


async def test_a_request_head_dribbled_or_never_sent_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: an ops port whose heads must come within 1 s (the default is IDLE_S, 10 s)
    monkeypatch.setattr("workers.ops.http.IDLE_S", 1.0)
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        silent = await asyncio.open_connection("127.0.0.1", server.port)
        slow = await asyncio.open_connection("127.0.0.1", server.port)
        slow[1].write(b"GET /status HTTP/1.1\r\nHost: x\r\n")

        async def dribble() -> bytes:  # one header line every 0.2 s, never the blank line
            while not slow[0].at_eof():
                slow[1].write(b"X-Slow: 1\r\n")
                await asyncio.sleep(0.2)
            return await slow[0].read()

        # Execute and Assert: both closed by the server (before: held an hour each)
        assert await asyncio.wait_for(silent[0].read(), TIMEOUT_S) == b""
        assert await asyncio.wait_for(dribble(), TIMEOUT_S) == b""
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


async def test_a_client_that_reads_no_answer_loses_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: answers of 200 kB; a connection that reads none is closed after 1 s
    monkeypatch.setattr("workers.ops.http.STALL_S", 1.0)
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    big = {"pad": "x" * 200_000}
    server = OpsServer(metrics, lambda: big, lambda: True, "127.0.0.1", 0)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        _, writer = await asyncio.open_connection(sock=sock)
        # Execute: 100 requests on one connection, and not one byte of their answers read
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 100)

        def closed() -> float | None:
            return metrics.registry.get_sample_value(
                "sl_bound_hits_total", {"table": "ops_stalled"}
            )

        # Assert: the server closed it (before: held as long as the client lived); the
        # count comes when the stall is seen, the connection goes at its close's callback
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not closed() or server._runner.server.connections:  # type: ignore[union-attr]
            assert asyncio.get_running_loop().time() < deadline, "never closed"
            await asyncio.sleep(0.05)
        assert (await raw_get(server.port, "/healthz", b""))[0] == 200
        writer.close()
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


class _SavedRun:
    """The run API's view of a server with one finished run whose model lies in ``path``."""

    def __init__(self, path: Path) -> None:
        run = types.SimpleNamespace(id="run-1", model=str(path))
        self.book = types.SimpleNamespace(get=lambda key, scope: run)

    def kept(self, run: object) -> object:
        return run


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs /proc")
async def test_model_downloads_that_read_slowly_hold_no_model_in_memory(tmp_path: Path) -> None:
    # Prepare: a saved model of 64 MiB, on an ops port in this process
    model = tmp_path / "server.pt"
    with model.open("wb") as fh:
        fh.truncate(64 * MIB)
        fh.seek(64 * MIB - 3)
        fh.write(b"END")
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    routes = RunApi(_SavedRun(model), "admin-secret").add_routes  # type: ignore[arg-type]
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0, routes)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    request = (
        b"GET /runs/run-1/model HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret\r\n\r\n"
    )
    slow = []
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) from here
        before = _kib("VmRSS")
        # Execute: 8 downloads that read their first byte, and nothing more
        for _ in range(8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(request)
            await asyncio.wait_for(reader.readexactly(1), TIMEOUT_S)
            slow.append(writer)
        peak = _kib("VmHWM")
        print(f"8 slow downloads of a 64 MiB model: peak RSS +{(peak - before) / 1024:.0f} MiB")
        # Assert: less than one model's worth held for the 8 (before: 8 x 64 MiB and more)
        assert (peak - before) * 1024 < 32 * MIB, (before, peak)
        # and one that reads gets the whole file
        status, body = await raw_get(server.port, "/runs/run-1/model", b"Bearer admin-secret")
        assert status == 200 and len(body) == 64 * MIB and body.endswith(b"END")
    finally:
        for writer in slow:
            writer.close()
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


async def test_scrapes_as_fast_as_a_client_can_take_at_most_their_share_of_the_loop(
    ops: OpsServer,
) -> None:
    # Prepare: 8 connections, each asking /metrics again as soon as it has its answer
    answered: list[float] = []
    loop = asyncio.get_running_loop()

    async def scrape(until: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
        try:
            while loop.time() < until:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                answered.append(loop.time())
        finally:
            writer.close()

    # Execute: for 2 s
    start = loop.time()
    await asyncio.wait_for(asyncio.gather(*(scrape(start + 2.0) for _ in range(8))), 30)
    # Assert: the burst (10 scrapes), then 5 a second (before: hundreds); the last waited
    # at most 8 turns of a scrape
    assert 10 <= len([t for t in answered if t < start + 2.0]) <= 10 + 2 * 5 + 1, len(answered)
    assert max(answered) - start < 2.0 + 8 * SCRAPE_COST / RATE + 1.0


async def _served(port: int) -> int:
    """The status of a ``/healthz`` request, or 0 for a connection reset unanswered."""
    try:
        return (await raw_get(port, "/healthz", b""))[0]
    except ConnectionError:
        return 0


async def test_connections_closed_at_once_leave_the_cap_free() -> None:
    # Prepare: a guarded site whose clock stands still (a place is never freed by time), and
    # that takes every new connection from one address (the cap is under test, not the rate)
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    accepts = AcceptRate(burst=10_000, clock=lambda: 0.0)
    site = GuardedSite(runner, "127.0.0.1", 0, accepts=accepts)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        # Execute: while the loop is busy (a training step), more than the cap's connections
        # come, each closed at once; the loop then accepts them in one burst
        for _ in range(MAX_CONNECTIONS + 20):
            socket.create_connection(("127.0.0.1", port)).close()
        # Assert: once the server has seen them closed, none holds a place; before, each
        # burst's connections held theirs for a second after they were gone
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while await _served(port) != 200:
            assert asyncio.get_running_loop().time() < deadline, "refused for good"
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()


async def test_a_head_of_a_model_has_no_body_to_confuse_the_next_answer(tmp_path: Path) -> None:
    # Prepare: a saved model, on an ops port
    model = tmp_path / "server.pt"
    model.write_bytes(b"MODEL" * 1000)
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    routes = RunApi(_SavedRun(model), "admin-secret").add_routes  # type: ignore[arg-type]
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0, routes)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        # Execute: HEAD of the model, then another request on the same connection
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"HEAD /runs/run-1/model HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret"
            b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), TIMEOUT_S)
        writer.close()
        # Assert: the model's length and no byte of it; the next answer follows the head
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 5000" in head
        assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\nok\n"), rest[:80]
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


class _ActiveRun:
    """The run API's view of a server with one active run (its model not saved yet)."""

    def __init__(self) -> None:
        model = torch.nn.Linear(256, 256)
        self.engine = types.SimpleNamespace(model=model, settle=lambda: None)
        run = types.SimpleNamespace(id="run-1", model="")
        self.book = types.SimpleNamespace(get=lambda key, scope: run)

    def engine_of(self, run: object) -> object:
        return self.engine

    def kept(self, run: object) -> object:
        return run


async def test_an_active_runs_model_is_saved_for_download_once_in_a_while() -> None:
    # Prepare: a run in training, whose model is saved in the event loop at each download
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    routes = RunApi(_ActiveRun(), "admin-secret").add_routes  # type: ignore[arg-type]
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0, routes)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        # Execute: a token holder downloads it five times in a row
        answers = [
            await raw_get(server.port, "/runs/run-1/model", b"Bearer admin-secret")
            for _ in range(5)
        ]
        # Assert: one save; the others told when to come back (before: five saves, and
        # with a 64 MiB model the loop was held 8.6 s of 10 s by a client asking in a loop)
        assert [status for status, _ in answers] == [200, 503, 503, 503, 503]
        assert torch.load(io.BytesIO(answers[0][1]), weights_only=True).keys() == {
            "weight",
            "bias",
        }
        assert "once every 10s" in json.loads(answers[1][1])["error"]
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


async def test_a_body_nobody_reads_ends_its_connection_at_once(ops: OpsServer) -> None:
    # Execute: a request announcing 100 GB of body (no route takes one), and the first 64 KiB
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
    writer.write(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
    writer.write(b"x" * 65536)
    # Assert: refused, and the connection closed without reading on (before: read and
    # thrown away for aiohttp's lingering 10 s, as fast as the client sent: 2 GB in 8 s,
    # a 10 ms ticker in the loop late 47% of the time)
    try:
        answer = await asyncio.wait_for(reader.read(), TIMEOUT_S / 2)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413 ")  # a body: refused
    except ConnectionResetError:
        pass  # closed with the body unread: the kernel may reset before the 405 is read
    finally:
        writer.close()


@pytest.mark.parametrize(
    "host, url", [("127.0.0.1", "http://127.0.0.1:9100"), ("::1", "http://[::1]:9100")]
)
async def test_a_guarded_site_names_itself_as_a_url(host: str, url: str) -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        assert GuardedSite(runner, host, 9100).name == url  # an IPv6 address in brackets
    finally:
        await runner.cleanup()


async def test_a_failing_status_says_so_without_its_error_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a status callback that fails with a message naming a private path
    def broken() -> dict[str, Any]:
        raise OSError(13, "Permission denied", "/srv/hospital-a/patients.parquet")

    metrics = WorkerMetrics("client", CollectorRegistry(), version="1")
    server = OpsServer(metrics, broken, lambda: True, "127.0.0.1", 0)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        # Execute: a stranger asks /status
        status, body = await raw_get(server.port, "/status", b"")
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)
    # Assert: a 500 that says where to look; the path is in the worker's log only
    assert status == 500 and b"patients" not in body and b"log says why" in body, body
    assert "patients.parquet" in caplog.text


async def test_no_answer_names_the_python_or_aiohttp_version() -> None:
    metrics = WorkerMetrics("client", CollectorRegistry(), version="1")
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0, metrics_token="t" * 32)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    heads = []
    try:
        for path in ("/healthz", "/metrics", "/no-such-page"):  # 200, 401, 404
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S))
            writer.close()
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)
    for head in heads:
        assert b"\r\nServer: sl-pipeline\r\n" in head and b"aiohttp" not in head, head
