"""Run a whole deployment in one event loop (real sockets, real encryption), for tests that
need to look inside the workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from workers.client.worker import ClientWorker
from workers.relay import RelayWorker
from workers.server.worker import ServerWorker


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds (bounded); fails the test if it never does."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{condition} did not hold within {timeout_s}s")
        await asyncio.sleep(0.01)


async def run_deployment(
    files: dict[str, Path],
    *overrides: str,
    timeout_s: float = 180,
    server_overrides: tuple[str, ...] = (),
    until: Callable[[ServerWorker], bool] | None = None,
) -> dict[str, Any]:
    """Run every client to its end, then stop the server (and relay). ``until`` is an
    event on the server to wait for (bounded) before stopping it: a bye is sent without a
    reply, so a client may return before its bye reached the server."""
    base = files["server"].parent
    server = ServerWorker(load(ServerConfig, files["server"], list(server_overrides)), base)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(server.serve(stop))]
    relay = None
    await wait_until(server.ready)
    if "relay-1" in files:
        relay = RelayWorker(load(RelayConfig, files["relay-1"]), base)
        tasks.append(asyncio.create_task(relay.serve(stop)))
        await wait_until(relay.ready)
    clients = [
        ClientWorker(load(ClientConfig, path, list(overrides)), base, progress=False)
        for name, path in sorted(files.items())
        if name.startswith("client-")
    ]
    try:
        summaries = await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), timeout_s)
        if until is not None:
            await wait_until(lambda: until(server))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
    return {"server": server, "relay": relay, "clients": clients, "summaries": summaries}
