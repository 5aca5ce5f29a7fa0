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
import torch
import zmq.asyncio

from sl_pipeline.errors import ConfigError, PeerError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, segment_inputs
from sl_pipeline.transport import DealerConnection
from workers.client.link import make_handshake
from workers.tools.inprocess import build_deployment, wait_until

from .conftest import load_client
from .test_relay_runs import serving

SERVER_EVERY4 = ('checkpoint.dir="state/server"', "checkpoint.every_steps=4")


def _step(step: int, act: torch.Tensor) -> Message:
    labels = torch.zeros(act.shape[0], dtype=torch.long)
    return Message(
        Kind.FORWARD, client="client-1", step=step, tensors={"act": act, "labels": labels}
    )


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


async def test_a_relay_refuses_a_step_older_than_its_newest_it_no_longer_holds(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a client applies steps 0..2 through the relay; the relay's cache then keeps
    # only its newest reply (as after a restart whose checkpoint kept no older replies)
    files = deployment(topology="multihop", dataset="breast_cancer")
    cfg = load_client(files["client-1"])
    handshake = make_handshake(cfg, files["server"].parent, "multihop")
    shape = segment_inputs(build_segments(cfg.model, "multihop"), cfg.model.in_shape)[1]
    steps = [_step(i, torch.randn(4, *shape)) for i in range(3)]
    ctx = zmq.asyncio.Context()
    async with serving(files) as run:
        conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
        try:
            await conn.handshake(handshake, 10.0)
            for msg in steps:
                await conn.send(msg)
                await conn.recv(30.0)
            run.relay.replies.compact()
            # Execute: a hostile client sends step 0 again (the server still holds it)
            await conn.send(steps[0])
            with pytest.raises(PeerError) as refused:
                await conn.recv(30.0)
        finally:
            conn.close()
            ctx.destroy(linger=0)
        applied = run.relay.steps_applied

    # Assert: refused as stale, not applied a second time by the relay
    assert applied == 3
    assert refused.value.remote_code == "stale_step" and "\n" not in refused.value.reason
