"""Red team, the relay: what its clients' messages may make it wait for.

Each test failed on the code before its fix (see docs/security.md, "Hostile peers")."""

from __future__ import annotations

import asyncio
import functools

import pytest
import zmq.asyncio

from sl_pipeline import transport
from sl_pipeline.config import RelayConfig, load
from sl_pipeline.messages import Kind, Message
from workers.relay import RelayWorker
from workers.server.worker import ServerWorker

from .conftest import load_server
from .test_hostile_peers import _until, assert_serving, join

HWM = 2  # what the relay's link upstream queues (1,000 by default: the attack takes longer)


async def test_byes_to_a_relay_whose_server_is_gone_never_hold_it(  # type: ignore[no-untyped-def]
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay passes each client's bye upstream and waits for no reply. While its server
    was gone, each bye queued on the link (libzmq keeps a reconnecting link's queue), and
    the bye after the queue's bound waited for room for ever: the relay answered nobody."""
    # Prepare: a server and a relay whose link upstream queues HWM messages
    monkeypatch.setattr(transport, "new_socket", functools.partial(transport.new_socket, hwm=HWM))
    files = deployment(topology="multihop", clients=1, dataset="breast_cancer")
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"]), base)
    relay = RelayWorker(load(RelayConfig, files["relay-1"]), base)
    server_stop, relay_stop = asyncio.Event(), asyncio.Event()
    server_task = asyncio.create_task(server.serve(server_stop))
    ctx = zmq.asyncio.Context()
    relay_task = None
    try:
        await _until(lambda: server.bound)
        relay_task = asyncio.create_task(relay.serve(relay_stop))
        await _until(relay.ready)
        bind, keys = relay.cfg.relay.bind, base / "keys"
        # Execute: the server goes; a client says hello and bye, more times than the link queues
        server_stop.set()
        await asyncio.wait_for(server_task, 15)
        for _ in range(HWM + 3):
            conn = await join(bind, relay.fingerprint, keys, ctx, server="relay-1")
            await conn.send(Message(kind=Kind.BYE))
            conn.close(linger_ms=2000)  # the bye leaves before the socket goes
        # Assert: the relay still says welcome and answers
        conn = await join(bind, relay.fingerprint, keys, ctx, server="relay-1")
        await assert_serving(conn, relay_task)
        conn.close()
    finally:
        server_stop.set()
        relay_stop.set()
        tasks = [t for t in (server_task, relay_task) if t is not None]
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        ctx.destroy(linger=0)
