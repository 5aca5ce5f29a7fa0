"""Connection churn on the ops port: a client opening and closing connections as fast as it
can (each within the 64-connection cap) is held to ``httpguard.NEW_PER_S`` new connections a
second from its address, the rest refused as they are accepted; Prometheus, from another address,
still scrapes. Over real loopback sockets (the churner on 127.0.0.2, the scraper on
127.0.0.1), and the bucket's arithmetic with a clock of the test's."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from workers.ops.http import OpsServer
from workers.ops.httpguard import NEW_BURST, NEW_PER_S, AcceptRate
from workers.ops.metrics import WorkerMetrics

TIMEOUT_S = 10.0
CHURN_S = 1.5


@pytest.fixture
async def ops() -> AsyncIterator[OpsServer]:
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    server = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


def _churn(port: int, seconds: float) -> tuple[int, float]:
    """From 127.0.0.2: connect and close at once, as fast as one thread can, for
    ``seconds``; then (connections opened, seconds taken)."""
    opened = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(TIMEOUT_S)
            sock.connect(("127.0.0.1", port))
            opened += 1
    return opened, time.monotonic() - start


def _scrape(port: int) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as r:
        return r.status, r.read()


def _refused(ops: OpsServer) -> float:
    value = ops.metrics.registry.get_sample_value(
        "sl_bound_hits_total", {"table": "ops_new_connections"}
    )
    return value or 0.0


async def test_a_churning_address_is_held_to_the_rate_while_prometheus_scrapes(
    ops: OpsServer,
) -> None:
    # Execute: a peer churns connections for 1.5 s; meanwhile, and after, Prometheus scrapes
    churn = asyncio.create_task(asyncio.to_thread(_churn, ops.port, CHURN_S))
    during = await asyncio.to_thread(_scrape, ops.port)
    opened, took = await asyncio.wait_for(churn, TIMEOUT_S + CHURN_S)
    after = await asyncio.to_thread(_scrape, ops.port)
    # Assert: the churner got the burst and the rate, no more (before: each connection was
    # served, 262 a second); each refusal counted; both scrapes answered
    allowed = NEW_BURST + NEW_PER_S * (took + 1.0)  # the server sees them a little later
    assert opened > 2 * allowed, f"the churner opened only {opened} in {took:.2f}s"
    assert _refused(ops) >= opened - allowed, (opened, _refused(ops))
    assert during[0] == after[0] == 200
    assert b'sl_bound_hits_total{table="ops_new_connections"}' in after[1]


async def test_a_refused_connection_is_told_why(ops: OpsServer) -> None:
    def ask_until_refused() -> bytes:
        """A request on a new connection each time, until one is refused (or 200 tries)."""
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", ops.port), 10, ("127.0.0.2", 0)) as sock:
                sock.settimeout(TIMEOUT_S)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = sock.recv(4096)
            if not answer.startswith(b"HTTP/1.1 200 "):
                return answer
        return b"never refused"

    # Execute: one address asks as fast as it can, each time on a new connection
    answer = await asyncio.to_thread(ask_until_refused)
    # Assert: a 503 whose body says what to do
    assert answer.startswith(b"HTTP/1.1 503 ") and b"try again in a second" in answer


def test_a_scrape_a_second_and_cli_calls_never_meet_the_bound() -> None:
    # Prepare: one address's bucket, on the test's clock
    now = [0.0]
    rate = AcceptRate(clock=lambda: now[0])
    # Execute: an hour of Prometheus scraping every second on a new connection, with
    # `sl-pipeline health` and three `runs` calls every second beside it, and a readiness
    # poll every 100 ms
    verdicts = []
    for tick in range(3600 * 10):
        now[0] = tick / 10
        if tick % 10 == 0:
            verdicts += [rate.allow("10.0.0.5") for _ in range(5)]
        verdicts.append(rate.allow("10.0.0.5"))
    # Assert
    assert all(verdicts)


def test_the_rate_counts_addresses_and_ipv6_networks() -> None:
    # Prepare
    now = [0.0]
    rate = AcceptRate(rate=2.0, burst=4.0, sources=3, clock=lambda: now[0])
    # Execute and Assert: a burst of 4, then 2 a second
    assert [rate.allow("10.0.0.1") for _ in range(5)] == [True] * 4 + [False]
    assert rate.allow("10.0.0.2")  # another address has its own bucket
    now[0] = 0.5
    assert rate.allow("10.0.0.1") and not rate.allow("10.0.0.1")
    # an IPv6 host's addresses are one /64: changing the last bits gets no new bucket
    assert all(rate.allow(f"2001:db8::{i:x}") for i in range(1, 5))
    assert not rate.allow("2001:db8::ffff:1")
    # an IPv4 client of a dual-stack socket counts as its IPv4 address, not as one /64
    assert not rate.allow("::ffff:10.0.0.1") and rate.allow("::ffff:10.0.0.2")
    # the table is full (3 sources), and none has refilled: a new address takes the place of
    # the one seen least recently (the /64, refused above), which starts afresh
    assert rate.allow("10.0.0.9")
    assert [rate.allow("2001:db8::1") for _ in range(5)] == [True] * 4 + [False]


def test_link_local_hosts_each_have_their_own_rate() -> None:
    # every host on a link is in fe80::/64: counted as that /64, one host spent the rate of
    # all of them (the ops review's finding); a global address still counts as its /64
    rate = AcceptRate(rate=2.0, burst=4.0, sources=8, clock=lambda: 0.0)
    assert [rate.allow("fe80::1%eth0") for _ in range(5)] == [True] * 4 + [False]
    assert rate.allow("fe80::2%eth0")
    assert all(rate.allow(f"2001:db8::{i:x}") for i in range(1, 5))
    assert not rate.allow("2001:db8::ffff:1")
