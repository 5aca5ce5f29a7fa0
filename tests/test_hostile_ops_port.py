"""A stranger holding the ops port's connections (issue 16, the ops red team): a real worker
process, attacked over loopback sockets as anyone who reaches the port can. The port shares
the worker's file descriptors and event loop with training, so what it holds is what the
worker can still do."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from workers.ops.http import parse_listen
from workers.ops.httpguard import MAX_CONNECTIONS, NEW_BURST

from .conftest import load_server
from .test_hostile_peers import _ready

TIMEOUT_S = 10.0
FDS = 256  # the worker's descriptor limit here (1,024 is the common default)


@contextlib.asynccontextmanager
async def _hold(listen: str, count: int) -> AsyncIterator[list[asyncio.StreamReader]]:
    """Open ``count`` idle connections to ``listen`` (each says nothing), from as many
    loopback addresses as the ops port's rate of new connections per address asks."""
    host, port = parse_listen(listen)
    held: list[asyncio.StreamWriter] = []
    readers = []
    per_source = int(NEW_BURST) // 2
    try:
        for i in range(count):
            source = (f"127.0.1.{1 + i // per_source}", 0)
            reader, writer = await asyncio.open_connection(host, port, local_addr=source)
            held.append(writer)
            readers.append(reader)
        yield readers
    finally:
        for writer in held:
            writer.close()


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
async def test_idle_connections_to_the_ops_port_leave_training_its_descriptors(  # type: ignore[no-untyped-def]
    deployment, procs
) -> None:
    # Prepare: a server whose descriptor limit is FDS, ready
    files = deployment(clients=1, dataset="breast_cancer", ops=True)
    listen = load_server(files["server"]).ops.listen
    server = procs.fork("server", files["server"])
    await _ready(listen, server)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (FDS, FDS))
    # Execute: a stranger opens more connections than the worker has descriptors, and holds
    # them while the client trains a whole run
    async with _hold(listen, FDS + 100) as readers:
        held = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
        client = procs.fork("client", files["client-1"])
        code = await asyncio.to_thread(client.wait, 240)
        # Assert: the run finished; the server held the cap's worth, and refused the rest
        assert code == 0, client.communicate()[1][-2000:]
        assert held < FDS - MAX_CONNECTIONS, held
        answer = await asyncio.wait_for(readers[-1].read(), TIMEOUT_S)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
