"""A relay in front of a server that checkpoints every N > 1 steps (red team, claim 1).

Such a server loses up to N-1 applied steps in a kill -9; its clients rewind and redo them
(workers/client/rollback.py). A relay cannot: it applied those steps to its own segment and
its clients, told ``recover = "resend"`` or nothing, never rewind. Before, the relay joined
that server and, after a server restart, carried on past the steps the server lost (the
server applied a step ahead of its newest as new): the parts no longer applied the same steps.
"""

from __future__ import annotations

import asyncio

import pytest

from sl_pipeline.errors import ConfigError
from workers.tools.inprocess import build_deployment, wait_until

SERVER_EVERY4 = ('checkpoint.dir="state/server"', "checkpoint.every_steps=4")


async def test_a_relay_refuses_a_server_that_checkpoints_every_4_steps(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server checkpointing every 4 steps, a relay in front of it
    files = deployment(topology="multihop", dataset="breast_cancer")
    run = build_deployment(files, server_overrides=SERVER_EVERY4)
    stop = asyncio.Event()
    server = asyncio.ensure_future(run.server.serve(stop))
    try:
        await wait_until(run.server.ready)
        # Execute
        with pytest.raises(ConfigError) as refused:
            await asyncio.wait_for(run.relay.serve(stop), 60)
    finally:
        stop.set()
        await asyncio.wait_for(server, 30)

    # Assert: one line naming the server's setting and what to do
    assert "\n" not in refused.value.message
    assert "checkpoints every 4 steps" in refused.value.message
    assert "checkpoint.every_steps = 1" in refused.value.message
