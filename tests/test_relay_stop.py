"""A relay told to stop while it waits for a server that went away stops at once: the step it
was passing on is answered `shutting_down` (retryable), not waited out for relay.timeout_s
per try (a service manager's stop timeout would SIGKILL it first)."""

from __future__ import annotations

import asyncio
import time

from workers.client.worker import ClientWorker
from workers.tools.inprocess import build_deployment, wait_until

from .conftest import load_client


async def test_a_relay_waiting_on_a_gone_server_stops_at_once(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: server and relay up; the server stops; a client's step reaches the relay
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1)
    run = build_deployment(files, relay_overrides=("relay.timeout_s=30",))
    server_stop, relay_stop = asyncio.Event(), asyncio.Event()
    server = asyncio.ensure_future(run.server.serve(server_stop))
    await wait_until(run.server.ready)
    relay = asyncio.ensure_future(run.relay.serve(relay_stop))
    await wait_until(run.relay.ready)
    server_stop.set()
    await asyncio.wait_for(server, 30)
    client = ClientWorker(
        load_client(files["client-1"], "client.retry_for_s=1"), files["server"].parent
    )
    client.progress = False
    training = asyncio.ensure_future(client.run())
    try:
        await wait_until(lambda: not run.relay._idle)  # it handles the step: waits upstream
        # Execute: the relay is told to stop while it waits on the gone server
        started = time.monotonic()
        relay_stop.set()
        await asyncio.wait_for(relay, 25)
        stopped_in = time.monotonic() - started
    finally:
        training.cancel()
        await asyncio.gather(training, return_exceptions=True)
    # Assert: well within one try of relay.timeout_s (30 s)
    assert stopped_in < 5, stopped_in
