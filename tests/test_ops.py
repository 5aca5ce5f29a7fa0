"""The ops HTTP endpoint, the worker metrics and the log formats."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sl_pipeline.errors import ConfigError
from workers.ops.clientseries import MAX_CLIENTS
from workers.ops.http import OpsServer, check_health, local_url, parse_listen
from workers.ops.labels import RUN_SERIES
from workers.ops.logs import configure_logging
from workers.ops.metrics import REJECT_REASONS, WorkerMetrics

TIMEOUT_S = 5.0


class _State:
    def __init__(self) -> None:
        self.ready = False
        self.status: dict[str, Any] = {"role": "client", "epoch": 2, "step": 17}


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics("client", CollectorRegistry(), version="1.2.3")


@pytest.fixture
def state() -> _State:
    return _State()


@pytest.fixture
async def ops(metrics: WorkerMetrics, state: _State) -> AsyncIterator[OpsServer]:
    server = OpsServer(metrics, lambda: state.status, lambda: state.ready, "127.0.0.1", 0)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        yield session


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with http.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


# --- OpsServer -------------------------------------------------------------------------


async def test_port_zero_binds_a_real_port(ops: OpsServer) -> None:
    assert ops.port > 0
    assert ops.url == f"http://127.0.0.1:{ops.port}"


async def test_metrics_endpoint_serves_prometheus_text(
    ops: OpsServer, metrics: WorkerMetrics, http: aiohttp.ClientSession
) -> None:
    # Prepare
    metrics.record_message("sent", "forward", 1234)
    # Execute
    status, ctype, body = await _get(http, f"{ops.url}/metrics")
    # Assert
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "version=0.0.4" in ctype
    assert 'sl_messages_total{direction="sent",kind="forward"} 1.0' in body
    assert 'sl_message_bytes_total{direction="sent",kind="forward"} 1234.0' in body
    assert 'sl_build_info{version="1.2.3",worker="client"} 1.0' in body


async def test_metrics_endpoint_speaks_openmetrics_when_asked(
    ops: OpsServer, http: aiohttp.ClientSession
) -> None:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with http.get(f"{ops.url}/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_healthz_is_ok(ops: OpsServer, http: aiohttp.ClientSession) -> None:
    status, _, body = await _get(http, f"{ops.url}/healthz")
    assert (status, body.strip()) == (200, "ok")


async def test_readyz_flips_from_503_to_200(
    ops: OpsServer, state: _State, http: aiohttp.ClientSession
) -> None:
    status, ctype, body = await _get(http, f"{ops.url}/readyz")
    assert status == 503
    assert ctype.startswith("application/json")
    assert json.loads(body)["ready"] is False
    assert json.loads(body)["reason"]

    state.ready = True
    status, _, body = await _get(http, f"{ops.url}/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True}


async def test_readyz_is_503_when_the_check_raises(
    metrics: WorkerMetrics, http: aiohttp.ClientSession
) -> None:
    def broken() -> bool:
        raise RuntimeError("model not loaded")

    server = OpsServer(metrics, dict, broken, "127.0.0.1", 0)
    await server.start()
    try:
        status, _, body = await _get(http, f"{server.url}/readyz")
    finally:
        await server.stop()
    assert status == 503
    assert "model not loaded" in json.loads(body)["reason"]


async def test_status_returns_the_callback_json(
    ops: OpsServer, state: _State, http: aiohttp.ClientSession
) -> None:
    status, ctype, body = await _get(http, f"{ops.url}/status")
    assert status == 200
    assert ctype.startswith("application/json")
    assert json.loads(body) == {"role": "client", "epoch": 2, "step": 17}

    state.status = {"path": Path("/tmp/x")}  # not JSON-native
    status, _, body = await _get(http, f"{ops.url}/status")
    assert (status, json.loads(body)) == (200, {"path": "/tmp/x"})


async def test_unknown_path_is_404(ops: OpsServer, http: aiohttp.ClientSession) -> None:
    status, _, _ = await _get(http, f"{ops.url}/nope")
    assert status == 404


async def test_stop_closes_the_port_and_is_idempotent(
    metrics: WorkerMetrics, http: aiohttp.ClientSession
) -> None:
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0)
    await server.start()
    url = server.url
    await server.stop()
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(http, f"{url}/healthz")


async def test_start_twice_is_refused(ops: OpsServer) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await ops.start()


async def test_port_in_use_raises_oserror(ops: OpsServer, metrics: WorkerMetrics) -> None:
    other = OpsServer(metrics, dict, lambda: True, "127.0.0.1", ops.port)
    with pytest.raises(OSError):
        await other.start()


async def test_check_health_follows_readiness(ops: OpsServer, state: _State) -> None:
    assert await check_health(ops.url, TIMEOUT_S) is False
    state.ready = True
    assert await check_health(ops.url, TIMEOUT_S) is True
    assert await check_health(f"127.0.0.1:{ops.port}", TIMEOUT_S) is True
    assert await check_health(f"{ops.url}/readyz", TIMEOUT_S) is True
    assert await check_health(f"{ops.url}/nope", TIMEOUT_S) is False


async def test_check_health_is_false_when_nothing_listens(ops: OpsServer) -> None:
    url = ops.url
    await ops.stop()
    assert await check_health(url, 1.0) is False


# --- parse_listen ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("server.example.org:9100", ("server.example.org", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:9100", ("::", 9100)),
        (" 10.0.0.5:9100 ", ("10.0.0.5", 9100)),
    ],
)
def test_parse_listen_accepts(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("9100", "no port"),
        (":9100", "empty host"),
        ("::1:9100", "brackets"),
        ("[::1]9100", "HOST:PORT"),
        ("[nothost]:9100", "not an IPv6"),
        ("host:http", "not a number"),
        ("host:-1", "not a number"),
        ("host:65536", "0..65535"),
        ("host:", "not a number"),
        ("bad host:9100", "bad host"),
        ("", "no port"),
    ],
)
def test_parse_listen_rejects(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        parse_listen(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("0.0.0.0:9100", "http://127.0.0.1:9100"),
        ("[::]:9100", "http://[::1]:9100"),
        ("[::1]:9100", "http://[::1]:9100"),
        ("10.0.0.5:9100", "http://10.0.0.5:9100"),
    ],
)
def test_local_url_maps_wildcards_to_loopback(listen: str, url: str) -> None:
    assert local_url(listen) == url


# --- metrics ---------------------------------------------------------------------------


def _families(metrics: WorkerMetrics) -> list[Any]:
    return list(metrics.registry.collect())


def test_metric_names_follow_the_conventions() -> None:
    metrics = WorkerMetrics("server", CollectorRegistry(), process_collector=False)
    families = _families(metrics)
    assert len(families) >= 20
    for family in families:
        for sample in family.samples:
            assert re.fullmatch(r"sl_[a-z0-9_]+", sample.name), sample.name
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name


def test_counter_attributes_end_in_total() -> None:
    metrics = WorkerMetrics("relay", CollectorRegistry())
    text = metrics.render().decode()
    for name in re.findall(r"^# TYPE (\S+) counter$", text, re.MULTILINE):
        assert name.endswith("_total"), name


def test_fresh_registries_do_not_collide() -> None:
    WorkerMetrics("client", CollectorRegistry())
    WorkerMetrics("client", CollectorRegistry())
    WorkerMetrics("server")  # its own registry, not the global default


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        WorkerMetrics("admin", CollectorRegistry())


def _value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_record_message_bounds_the_kind(metrics: WorkerMetrics) -> None:
    metrics.record_message("received", "FORWARD", 10)
    metrics.record_message("received", "made-up-kind", 7)
    assert _value(metrics, "sl_messages_total", direction="received", kind="forward") == 1
    assert _value(metrics, "sl_message_bytes_total", direction="received", kind="other") == 7
    with pytest.raises(ValueError, match="direction"):
        metrics.record_message("sideways", "forward", 1)
    with pytest.raises(ValueError, match="nbytes"):
        metrics.record_message("sent", "forward", -1)


def test_run_and_client_series_stay_bounded_and_follow_each_step() -> None:
    # Prepare: a server's metrics, one run and one client that step
    server = WorkerMetrics("server", CollectorRegistry())
    assert server.clients is not None
    server.record_run("run-0", 1, True, 0.5)
    server.clients.stepped("client-0", 1, 0)
    # Execute: the same run and client step again, then more runs and clients than are kept
    server.record_run("run-0", 2, True, 0.25)
    server.clients.stepped("client-0", 2, 1)
    assert _value(server, "sl_run_steps", run="run-0") == 2
    assert _value(server, "sl_run_train_loss", run="run-0") == 0.25
    assert _value(server, "sl_client_steps", client="client-0") == 2
    assert _value(server, "sl_client_epoch", client="client-0") == 2
    for i in range(1, RUN_SERIES + 1):
        server.record_run(f"run-{i}", i, True)
    for i in range(1, MAX_CLIENTS + 1):
        server.clients.stepped(f"client-{i}", i, 0)
    # Assert: the oldest run and client lost their series, the newest have theirs
    assert _value(server, "sl_run_steps", run="run-0") is None
    assert _value(server, "sl_run_steps", run=f"run-{RUN_SERIES}") == RUN_SERIES
    assert _value(server, "sl_client_steps", client="client-0") is None
    assert _value(server, "sl_client_steps", client=f"client-{MAX_CLIENTS}") == MAX_CLIENTS
    # Execute / Assert: an evicted run that reports again gets exported series again
    server.record_run("run-0", 3, False)
    assert _value(server, "sl_run_steps", run="run-0") == 3


def test_record_rejected_maps_unknown_reasons_to_other(metrics: WorkerMetrics) -> None:
    metrics.record_rejected("replay")
    metrics.record_rejected("cosmic-ray")
    assert _value(metrics, "sl_rejected_messages_total", reason="replay") == 1
    assert _value(metrics, "sl_rejected_messages_total", reason="other") == 1


def test_bounded_label_sets_exist_from_the_start(metrics: WorkerMetrics) -> None:
    for reason in REJECT_REASONS:
        assert _value(metrics, "sl_rejected_messages_total", reason=reason) == 0
    assert _value(metrics, "sl_handshakes_total", result="ok") == 0
    assert _value(metrics, "sl_messages_total", direction="sent", kind="bye") == 0
    # No privacy mechanism reported yet: no series rather than a misleading epsilon of 0.
    assert _value(metrics, "sl_privacy_epsilon", mechanism="dpsgd") is None


def test_step_privacy_and_handshake_helpers(metrics: WorkerMetrics) -> None:
    metrics.record_step(41, now_s=1_700_000_000.0)
    metrics.set_privacy("dpsgd", 2.5, budget=8.0)
    metrics.set_privacy("activation_noise", 0.7)
    metrics.record_handshake("not_admitted")
    assert _value(metrics, "sl_steps_applied_total") == 1
    assert _value(metrics, "sl_step") == 41
    assert _value(metrics, "sl_last_step_timestamp_seconds") == 1_700_000_000.0
    assert _value(metrics, "sl_privacy_epsilon_budget", mechanism="dpsgd") == 8.0
    assert _value(metrics, "sl_privacy_epsilon_budget", mechanism="activation_noise") == 0.0
    assert _value(metrics, "sl_handshakes_total", result="not_admitted") == 1
    with pytest.raises(ValueError):
        metrics.set_privacy("laplace", 1.0)
    with pytest.raises(ValueError):
        metrics.record_handshake("maybe")


def test_histogram_buckets_span_1ms_to_10s(metrics: WorkerMetrics) -> None:
    metrics.step_rtt_seconds.observe(0.003)
    metrics.server_compute_seconds.observe(12.0)
    text = metrics.render().decode()
    for family in text_string_to_metric_families(text):
        if family.name in ("sl_step_rtt_seconds", "sl_server_compute_seconds"):
            bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
            assert bounds[0] == "0.001" and bounds[-2] == "10.0" and bounds[-1] == "+Inf"
    assert _value(metrics, "sl_server_compute_seconds_bucket", le="10.0") == 0
    assert _value(metrics, "sl_server_compute_seconds_count") == 1


def test_render_parses_as_prometheus_text(metrics: WorkerMetrics) -> None:
    names = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    assert {"sl_messages", "sl_step_rtt_seconds", "sl_build_info", "sl_epoch"} <= names


# --- logs ------------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_logs_are_one_object_per_line() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", "server", stream=stream)
    configure_logging("json", "INFO", "server", stream=stream)  # idempotent: no duplicates
    logging.getLogger("workers.test").info("epoch %d done", 3, extra={"loss": 0.25})
    logging.getLogger("workers.test").debug("hidden at INFO")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["msg"] == "epoch 3 done"
    assert event["level"] == "INFO"
    assert event["logger"] == "workers.test"
    assert event["role"] == "server"
    assert event["loss"] == 0.25
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["ts"])


@pytest.mark.usefixtures("restore_root_logger")
def test_exceptions_stay_on_one_line_in_both_formats() -> None:
    for fmt in ("json", "text"):
        stream = io.StringIO()
        configure_logging(fmt, "DEBUG", "client", stream=stream)
        try:
            raise KeyError("boom")
        except KeyError:
            logging.getLogger("t").exception("multi\nline")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1, (fmt, lines)
        assert "KeyError" in lines[0]


@pytest.mark.usefixtures("restore_root_logger")
def test_text_logs_are_readable() -> None:
    stream = io.StringIO()
    configure_logging("text", "info", "relay", stream=stream)
    logging.getLogger("workers.relay").warning("peer gone", extra={"peer": "a b"})
    line = stream.getvalue().strip()
    assert re.search(r'WARNING relay workers\.relay: peer gone peer="a b"$', line), line


@pytest.mark.usefixtures("restore_root_logger")
def test_logs_go_to_stderr_as_it_is_now_not_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stderr replaced and closed since the call (a test's capture) made every later record
    a 'Logging error' traceback on the new one."""
    old, new = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", old)
    configure_logging("text", "info", "client")
    old.close()
    monkeypatch.setattr(sys, "stderr", new)
    logging.getLogger("workers.client").warning("still seen")
    assert new.getvalue().count("\n") == 1 and "still seen" in new.getvalue()
    new.close()  # closed while a worker's thread logs: the process's own stderr gets it
    logging.getLogger("workers.client").warning("not lost")


@pytest.mark.parametrize(("fmt", "level"), [("xml", "INFO"), ("json", "LOUD")])
def test_configure_logging_rejects_bad_values(fmt: str, level: str) -> None:
    with pytest.raises(ConfigError):
        configure_logging(fmt, level)


async def test_status_names_no_run_client_without_the_token(
    metrics: WorkerMetrics, state: _State, http: aiohttp.ClientSession
) -> None:
    # Prepare: a server's status with a run two clients trained in (red team's a6 leak)
    run = {
        "id": "run-1",
        "steps": 40,
        "clients": ["client-1", "client-2"],
        "finished_clients": ["client-2"],
        "accuracies": {"client-2": 0.9},
        "test_accuracy": 0.9,
    }
    state.status = {"role": "server", "peers": [], "runs": [run]}
    ops = OpsServer(metrics, lambda: state.status, lambda: True, "127.0.0.1", 0, None, "tok")
    await asyncio.wait_for(ops.start(), TIMEOUT_S)
    try:
        # Execute
        _, _, anyone = await _get(http, f"{ops.url}/status")
        headers = {"Authorization": "Bearer tok"}
        async with http.get(f"{ops.url}/status", headers=headers) as response:
            operator = json.loads(await response.text())
    finally:
        await asyncio.wait_for(ops.stop(), TIMEOUT_S)
    # Assert: counts for anyone, the names unchanged for the token's holder
    assert "client-" not in anyone
    counted = json.loads(anyone)["runs"][0]
    assert (counted["clients"], counted["finished_clients"], counted["accuracies"]) == (2, 1, 1)
    assert counted["steps"] == 40 and counted["test_accuracy"] == 0.9
    assert operator["runs"] == [run]
