"""How often one client behind a relay makes the relay join the server again:
``python -m bench.relay_rejoins [--seconds S] [--many-addresses]``.

A client that says hello without a resume point may be starting a new run, so at its next
well-formed step the relay joins the server again to learn the run. This drives that loop
as a hostile client would (hello afresh, then the step it took once, which the relay answers
from its cache) against a server and a relay of an ``init`` deployment (multihop,
breast_cancer) in this process, over loopback, for ``--seconds``. ``--many-addresses`` lifts
the per-address hello rate (20/s after a burst of 100) as if the client came from many
source addresses. Then an honest client behind the same relay trains its epoch. Prints one
JSON object: pairs sent, the relay's joins of the server, refusals, the honest client's steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio

from sl_pipeline.config import ClientConfig, load
from sl_pipeline.errors import PeerError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.client.link import make_handshake
from workers.client.worker import ClientWorker
from workers.runtime import eventloop
from workers.runtime.bounded import RateLimiter
from workers.tools.inprocess import InProcess, build_deployment, wait_until
from workers.tools.localdeploy import init_deployment


async def fresh_starts(run: InProcess, files: dict[str, Path], seconds: float) -> dict[str, Any]:
    """client-1's key: hello afresh and step (0, 0), over and over for ``seconds``."""
    assert run.relay is not None
    relay = run.relay
    joins: list[str] = []
    join = relay._join_upstream

    async def counted(speaking_for: str = "") -> dict[str, Any]:
        joins.append(speaking_for)
        return await join(speaking_for)

    relay._join_upstream = counted  # type: ignore[method-assign]
    cfg = load(ClientConfig, files["client-1"], [])
    handshake = make_handshake(cfg, files["server"].parent, "multihop")
    tensors = {
        "act": torch.zeros([4, *(relay.act_shape or ())]),
        "labels": torch.zeros(4, dtype=torch.long),
    }
    step = Message(Kind.FORWARD, client=cfg.client.name, epoch=0, step=0, tensors=tensors)
    ctx = zmq.asyncio.Context()
    pairs = refused = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
            handshake.hello = {**handshake.hello, "resume": None}
            try:
                await conn.handshake(handshake, 10.0)
                await conn.send(step)
                await conn.recv(10.0)
            except PeerError:
                refused += 1
            finally:
                conn.close()
            pairs += 1
    finally:
        ctx.destroy(linger=0)
    elapsed = time.monotonic() - start
    rejoins = joins.count(cfg.client.name)
    return {
        "pairs": pairs,
        "seconds": round(elapsed, 1),
        "relay_joins": rejoins,
        "joins_per_s": round(rejoins / elapsed, 1),
        "refused": refused,
    }


async def measure(seconds: float, many_addresses: bool) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp()) / "deploy"
    made = init_deployment(out, topology="multihop", dataset="breast_cancer", clients=2)
    files = {name: Path(path) for name, path in made["files"].items()}
    run = build_deployment(files)
    assert run.relay is not None
    if many_addresses:
        run.relay.hello_rate = run.server.hello_rate = RateLimiter(1e9, 10**9)
    stop = asyncio.Event()
    services = [asyncio.ensure_future(run.server.serve(stop))]
    try:
        await wait_until(run.server.ready)
        services.append(asyncio.ensure_future(run.relay.serve(stop)))
        await wait_until(run.relay.ready)
        result = await fresh_starts(run, files, seconds)
        started = time.monotonic()
        honest = ClientWorker(load(ClientConfig, files["client-2"], []), out, progress=False)
        summary = await asyncio.wait_for(honest.run(), 120)
        result["honest_steps"] = summary["steps"]
        result["honest_s"] = round(time.monotonic() - started, 2)
        result["server_runs"] = [r.id for r in run.server.book.runs.values()]
    finally:
        stop.set()
        await asyncio.gather(*services, return_exceptions=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_rejoins")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--many-addresses", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(eventloop.run(measure(args.seconds, args.many_addresses))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
