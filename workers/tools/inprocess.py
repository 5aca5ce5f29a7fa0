"""Run a whole deployment in one event loop: the server (plus a relay for multi-hop) and
every client, over real encrypted loopback sockets, keeping the worker objects.

The privacy audit (:mod:`workers.tools.audit`) trains this way to look at what crossed the
wire, and so do the tests that need to look inside the workers. :func:`build_deployment`
makes the workers (so that a caller can attach its taps before anything runs),
:func:`train` runs them until every client is done, :func:`run_deployment` does both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from sl_pipeline.errors import PeerError, SLError, TransportError
from workers.client.worker import ClientWorker
from workers.relay import RelayWorker
from workers.server.worker import ServerWorker

DEFAULT_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass
class InProcess:
    """The workers of one deployment in this process, and what the clients returned."""

    server: ServerWorker
    relay: RelayWorker | None
    clients: list[ClientWorker]
    summaries: list[dict[str, Any]] = field(default_factory=list)


async def wait_until(condition: Callable[[], bool], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``condition`` until it holds, for at most ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise TransportError(f"{condition} did not hold within {timeout_s}s")
        await asyncio.sleep(0.01)


def build_deployment(
    files: dict[str, Path],
    client_overrides: Sequence[str] = (),
    server_overrides: Sequence[str] = (),
    relay_overrides: Sequence[str] = (),
) -> InProcess:
    """The workers of the deployment ``files`` (name -> TOML path), built but not started:
    the server, the relay if there is one (``relay-1``), and the ``client-*`` in name order."""
    base = files["server"].parent
    server = ServerWorker(load(ServerConfig, files["server"], list(server_overrides)), base)
    relay = None
    if "relay-1" in files:
        relay = RelayWorker(load(RelayConfig, files["relay-1"], list(relay_overrides)), base)
    clients = [
        ClientWorker(load(ClientConfig, path, list(client_overrides)), base, progress=False)
        for name, path in sorted(files.items())
        if name.startswith("client-")
    ]
    return InProcess(server, relay, clients)


def raise_crash(services: Sequence[asyncio.Future[Any]]) -> None:
    """Re-raise the error of a server or relay that stopped early, as one SLError line."""
    for service in services:
        error = service.exception() if service.done() and not service.cancelled() else None
        if isinstance(error, SLError):
            raise error
        if error is not None:
            raise SLError(
                f"a worker crashed during training: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}"
            ) from error


def raise_failure(run: InProcess) -> None:
    """A client was told ``internal``: the server's or relay's own failure (a full disk
    while it checkpoints) in its place, as one SLError line."""
    for worker in (run.server, run.relay):
        failure = worker.failure if worker is not None else None
        if isinstance(failure, SLError):
            raise failure
        if failure is not None:
            raise SLError(f"a worker failed: {type(failure).__name__}: {failure}") from failure


async def _started(service: asyncio.Future[Any], ready: Callable[[], bool]) -> None:
    """Wait (bounded) until a service is ready; a service that ended first re-raises."""
    await wait_until(lambda: ready() or service.done())
    if service.done():
        raise_crash([service])
        raise TransportError("a worker stopped before it was ready")


async def train(
    run: InProcess,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    until: Callable[[ServerWorker], bool] | None = None,
) -> list[dict[str, Any]]:
    """Start the server (and relay), run every client to its end, then stop them. A worker
    that crashes, or a run longer than ``timeout_s``, ends it with an error. ``until`` is an
    event on the server to wait for (bounded) before stopping it: a bye is sent without a
    reply, so a client may return before its bye reached the server."""
    stop = asyncio.Event()
    services = [asyncio.ensure_future(run.server.serve(stop))]
    try:
        await _started(services[0], run.server.ready)
        if run.relay is not None:
            services.append(asyncio.ensure_future(run.relay.serve(stop)))
            await _started(services[1], run.relay.ready)
        runs = asyncio.ensure_future(asyncio.gather(*(c.run() for c in run.clients)))
        await asyncio.wait(
            [runs, *services], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not runs.done():
            runs.cancel()
            await asyncio.gather(runs, return_exceptions=True)
            raise_crash(services)
            if any(service.done() for service in services):
                raise TransportError("a worker stopped before the clients finished")
            raise TransportError(f"training did not finish within {timeout_s:.0f}s")
        error = runs.exception()
        if isinstance(error, PeerError) and error.remote_code == "internal":
            raise_failure(run)
        run.summaries = list(runs.result())
        if until is not None:
            await wait_until(lambda: until(run.server))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), STOP_TIMEOUT_S)
    return run.summaries


async def run_deployment(
    files: dict[str, Path],
    *client_overrides: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    server_overrides: Sequence[str] = (),
    relay_overrides: Sequence[str] = (),
    until: Callable[[ServerWorker], bool] | None = None,
) -> InProcess:
    """Build the deployment ``files`` and :func:`train` it; the workers and summaries."""
    run = build_deployment(files, client_overrides, server_overrides, relay_overrides)
    await train(run, timeout_s, until)
    return run


__all__ = [
    "InProcess",
    "build_deployment",
    "run_deployment",
    "train",
    "wait_until",
]
