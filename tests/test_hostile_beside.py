"""An honest client beside a hostile peer trains as it does alone (issue 15, what finding 1
must show): the three crash triggers from an admitted key, and the out-of-range hellos of
``--insecure`` mode, sent while client-1 trains, leave the server serving, and client-1
finishes with the same step count and test accuracy as with nobody else on the server. (The
same triggers against a relay: ``test_a_relay_survives_the_crash_triggers``.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker

from .conftest import load_client
from .test_hostile_numeric import serving
from .test_hostile_peers import (
    HUGE,
    _insecure_hello,
    assert_refused,
    assert_serving,
    forward,
    header,
    join,
    send_raw,
)

Attack = Any  # async (server, ctx, keys) -> None


async def _train(files: dict[str, Path], attack: Attack = None) -> dict[str, Any]:
    """client-1's summary, with ``attack`` run while it trains (when given)."""
    base = files["server"].parent
    async with serving(files) as (server, ctx, task):
        client = ClientWorker(load_client(files["client-1"]), base, progress=False)
        training = asyncio.create_task(client.run())
        if attack is not None:
            await attack(server, ctx, base / "keys")
        summary: dict[str, Any] = await asyncio.wait_for(training, 120)
        assert not task.done(), "the server died"
        return summary


async def _crash_triggers(server: ServerWorker, ctx: zmq.asyncio.Context, keys: Path) -> None:
    conn = await join(server.cfg.server.bind, server.fingerprint, keys, ctx, name="client-2")
    huge_step = json.dumps(header()).replace('"step": 0', f'"step": {HUGE}').encode()
    await send_raw(conn, huge_step)
    await assert_refused(conn)
    shape = header(tensors=[{"name": "act", "dtype": "float32", "shape": [0, 2**64]}])
    await send_raw(conn, shape, b"")
    await assert_refused(conn)
    await conn.send(forward(torch.tensor(3, dtype=torch.int8), act_scale=torch.ones(1)))
    await assert_refused(conn)
    await assert_serving(conn)
    conn.close()


async def _insecure_hellos(server: ServerWorker, ctx: zmq.asyncio.Context, keys: Path) -> None:
    bind = server.cfg.server.bind
    for payload in (b'{"client": ' + HUGE.encode() + b"}", b"[" * 8000 + b"]" * 8000):
        assert (await _insecure_hello(bind, payload, ctx))[0] == b"sl-refuse"


@pytest.mark.parametrize(
    ("insecure", "attack"),
    [(False, _crash_triggers), (True, _insecure_hellos)],
    ids=["crash-triggers", "insecure-hellos"],
)
async def test_an_honest_client_beside_the_crash_triggers_trains_as_alone(
    deployment, insecure: bool, attack: Attack
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: what client-1 achieves with nobody else on the server
    make = dict(clients=2, dataset="breast_cancer", epochs=2, insecure=insecure)
    alone = await _train(deployment(**make))
    # Execute: the same, while the hostile peer sends its triggers
    beside = await _train(deployment(**make), attack)
    # Assert: the server lived (checked in _train); the same steps and accuracy
    print(
        f"alone: {alone['steps']} steps, accuracy {alone['test_accuracy']:.4f}; beside the "
        f"attack: {beside['steps']} steps, accuracy {beside['test_accuracy']:.4f}"
    )
    assert beside["steps"] == alone["steps"] > 0
    assert beside["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1e-6)
