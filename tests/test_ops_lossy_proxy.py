"""The fault-injection proxy's command line ends, with one line saying why, when its
upstream is bad: no endpoint, nothing listening there, or gone once it ran. Before, it
printed its endpoint and forwarded nothing, forever."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.conftest import ROOT
from workers.tools.ports import free_port

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def proxy(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.lossy_proxy", *argv),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def ended(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """(exit status, stderr) once it exits, bounded."""
    assert proc.stderr is not None
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    return await asyncio.wait_for(proc.wait(), 10), err.decode()


@pytest.mark.parametrize("upstream", ["127.0.0.1:5555", "http://127.0.0.1:5555"])
async def test_an_upstream_that_is_no_endpoint_is_refused(upstream: str) -> None:
    async with proxy("--upstream", upstream) as proc:
        code, err = await ended(proc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "is not a TCP endpoint" in err, err


async def test_it_exits_when_nothing_listens_upstream() -> None:
    upstream = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    async with proxy("--upstream", upstream, "--wait-s", "0.5") as proc:
        code, err = await ended(proc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"upstream {upstream}: nothing accepts connections there" in err, err


async def test_it_exits_when_its_upstream_goes_away() -> None:
    # Prepare: an upstream that accepts connections
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = f"tcp://127.0.0.1:{port}"
    async with proxy("--upstream", upstream, "--wait-s", "0.5") as proc:
        assert proc.stdout is not None
        endpoint = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
        # Execute: the upstream goes away
        server.close()
        await server.wait_closed()
        code, err = await ended(proc)
    # Assert: it ends in one line, its counters printed as at a stop
    assert code == 2 and "nothing accepts connections there" in err, err
    assert '"forwarded": 0' in (await proc.stdout.read()).decode()
