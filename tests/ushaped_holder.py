"""A u-shaped client that opens one step and never closes it: a test's stand-in for a client
killed right after its forward was answered (or a hostile one that never sends the gradient).

``python -m tests.ushaped_holder SERVER_TOML NAME FOLDER``: joins the server of SERVER_TOML
with NAME's admitted key (``keys/NAME.key`` beside it) and touches FOLDER/joined; once
FOLDER/go exists it sends one forward, touches FOLDER/opened when the output comes back, and
waits to be killed. Its step is then open on the server, and nothing will close it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch
import zmq.asyncio

from sl_pipeline.config import ServerConfig, load
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import load_keypair, load_public_key
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.models import build_segments, fingerprint, segment_inputs
from sl_pipeline.transport import DealerConnection

WAIT_S = 120.0  # for the test's go, and for the server's answer


async def hold(config: Path, name: str, folder: Path) -> None:
    cfg = load(ServerConfig, config)
    keys = config.parent / "keys"
    shape = segment_inputs(build_segments(cfg.model, "ushaped"), cfg.model.in_shape)[1]
    assert shape is not None
    hello = {"v": PROTOCOL_VERSION, "client": name, "role": "trainer"}
    hello["model"] = fingerprint(cfg.model, "ushaped")
    keypair, server = load_keypair(keys / f"{name}.key"), load_public_key(keys / "server.pub")
    conn = DealerConnection(zmq.asyncio.Context(), cfg.server.bind)
    await conn.handshake(ClientHandshake(hello, keypair, server), WAIT_S)
    await conn.send(Message(Kind.HEARTBEAT))  # confirms the session
    assert (await conn.recv(WAIT_S)).kind is Kind.HEARTBEAT
    (folder / "joined").touch()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not (folder / "go").exists() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await conn.send(Message(Kind.FORWARD, tensors={"act": torch.rand(4, *shape)}))
    assert (await conn.recv(WAIT_S)).kind is Kind.RESULT
    (folder / "opened").touch()
    await asyncio.sleep(WAIT_S)  # the step stays open: the test kills this process


if __name__ == "__main__":
    asyncio.run(hold(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
