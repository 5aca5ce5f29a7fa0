"""Red team, the message port: what strangers without a key may hold of a listening worker.

A real server process, attacked over loopback sockets as anyone who reaches its port can.
Each test failed on the code before its fix (see docs/security.md, "Pre-authentication")."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sl_pipeline.zmtp_pending import PendingHandshakes, source_of
from sl_pipeline.zmtp_router import split_endpoint

from .conftest import load_server
from .test_hostile_peers import _ready

FDS = 256  # the worker's descriptor limit here (1,024 is the common default)
ADDRESSES = 4  # the stranger's loopback addresses


async def _keep_open(host: str, port: int, source: str, held: list[int]) -> None:
    """One of the stranger's connections, opened again whenever the server closes it: it
    says nothing, as a half-open handshake would (an attacker's choice: at most one
    reopening per slot per 0.5 s)."""
    while True:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            held[0] += 1
            try:
                await reader.read()  # until the server closes it
            finally:
                held[0] -= 1
                writer.close()
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def _strangers(bind: str, count: int) -> AsyncIterator[list[int]]:
    """``count`` idle connections to ``bind`` from ADDRESSES loopback addresses, kept open."""
    host, port = split_endpoint(bind)
    held = [0]
    tasks = [
        asyncio.ensure_future(_keep_open(host, port, f"127.0.2.{1 + i % ADDRESSES}", held))
        for i in range(count)
    ]
    try:
        yield held
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
async def test_strangers_holding_half_open_connections_leave_training_its_descriptors(  # type: ignore[no-untyped-def]
    deployment, procs
) -> None:
    """Before: nothing bounded how many connections strangers could hold in the ZMTP
    handshake (each for its 15 s): more of them than the worker's descriptors left it unable
    to accept its client's connection (asyncio's accept failing with EMFILE) or open a file."""
    # Prepare: a server whose descriptor limit is FDS, ready
    files = deployment(clients=1, dataset="breast_cancer", ops=True)
    cfg = load_server(files["server"])
    server = procs.fork("server", files["server"])
    await _ready(cfg.ops.listen, server)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (FDS, FDS))
    # Execute: strangers hold more connections than the worker has descriptors while the
    # client trains a whole run
    async with _strangers(cfg.server.bind, FDS + 100):
        client = procs.fork("client", files["client-1"], "--set", "client.retry_for_s=30")
        code = await asyncio.to_thread(client.wait, 180)
        fds = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
    # Assert: the run finished, and the server kept most of its descriptors
    assert code == 0, client.communicate()[1][-2000:]
    assert fds < FDS // 2, fds


def test_the_handshakes_held_are_bounded_per_address_and_a_flood_pushes_out_its_own() -> None:
    # Prepare: room for 3 from one address, 6 in all
    table = PendingHandshakes(per_address=3, max_pending=6)
    honest = table.open(b"honest", "10.0.0.9")
    # Execute: a flood from two addresses, and one address more than its share
    flood = [table.open(bytes([i]), f"10.0.0.{1 + i % 2}") for i in range(7)]
    # Assert: the honest handshake stays; each address holds at most 3, the biggest
    # holder's oldest going to make room; an IPv6 /64 counts as one address
    assert honest == (True, None)
    assert flood[:5] == [(True, None)] * 5
    assert flood[5] == (True, bytes([0]))  # 10.0.0.1 held 3, the most: its oldest goes
    assert flood[6] == (True, bytes([1]))  # then 10.0.0.2 did
    assert table.open(b"more", "10.0.0.1") == (False, None)  # it holds 3 again
    assert len(table) == 6
    table.close(b"honest")
    assert len(table) == 5
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff") == "2001:db8::/64"
    assert source_of("::ffff:10.0.0.1") == "10.0.0.1"
