"""``python -m bench.step_trace [--model digits_cnn] [--steps 400] [--free]``: one split
step's wall time, piece by piece, across both processes.

The same step ``bench.overhead`` times: the real server worker in a child process and the
real :class:`ClientWorker` here. Both stamp ``time.monotonic_ns()`` (one clock for every
process on a host) at the edges of a step's pieces, by wrapping methods of the real
classes in this tool only; the server writes its stamps out on SIGUSR2. Prints the median
of each piece over the steps, in the order a step runs them, then the server's deferred
update (reply-first) and its idle wait, which overlap the client's half. By default each
party runs on its own core (``--free``: the scheduler's choice), as ``overhead_ratio_pinned``.

cProfile (``bench.profile_step``) says which functions use the CPU; this says where the
wall time goes, waiting included: a hand-over to ZeroMQ's I/O thread or a wake-up shows
here and not there. The wrappers cost about a microsecond each.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq.asyncio

from sl_pipeline.config import ClientConfig, from_mapping
from sl_pipeline.data import batch_order
from workers.runtime import eventloop

from .common import REPO, median, party_cores, pin_process, stop_process, wait_for
from .models import BATCH, MODELS
from .overhead import configs, train_step

Stamp = tuple[str, int]  # (edge, monotonic ns)
STAMPS: list[Stamp] = []
WARMUP = 30
# (from edge, to edge, what runs between), in the order of one step; C = client, S = server.
PIECES = (
    ("Cstep0", "Ccut0", "client: start of the step (zero_grad)"),
    ("Ccut0", "Ccut1", "client: forward of its segment"),
    ("Ccut1", "Csend0", "client: build the forward message"),
    ("Csend0", "Csend1", "client: encode, seal, hand to ZeroMQ"),
    ("Csend1", "Sread0", "to the server's first read of it"),
    ("Sread0", "Srecv1", "server: read, ZMTP parse, recv"),
    ("Srecv1", "Seng0", "server: open, decode, dispatch"),
    ("Seng0", "Seng1", "server: engine (forward, loss, cut gradient)"),
    ("Seng1", "Ssend0", "server: bookkeeping before the reply"),
    ("Ssend0", "Ssend1", "server: encode, seal, write the reply"),
    ("Ssend1", "Cwait1", "to the client's wake-up with it"),
    ("Cwait1", "Capply0", "client: receive, open, decode, check"),
    ("Capply0", "Capply1", "client: backward and optimizer step"),
    ("Capply1", "Cstep1", "client: end of the step"),
)


def _wrap(cls: Any, name: str, edge: str) -> None:
    """Stamp ``edge + '0'`` when ``cls.name`` is entered, ``edge + '1'`` when it returns."""
    original = getattr(cls, name)
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def stamped_async(*args: Any, **kwargs: Any) -> Any:
            STAMPS.append((edge + "0", time.monotonic_ns()))
            try:
                return await original(*args, **kwargs)
            finally:
                STAMPS.append((edge + "1", time.monotonic_ns()))

        setattr(cls, name, stamped_async)
        return

    @functools.wraps(original)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        STAMPS.append((edge + "0", time.monotonic_ns()))
        try:
            return original(*args, **kwargs)
        finally:
            STAMPS.append((edge + "1", time.monotonic_ns()))

    setattr(cls, name, stamped)


def instrument_server() -> None:
    from sl_pipeline.zmtp_conn import Connection
    from sl_pipeline.zmtp_router import ZmtpRouter
    from workers.server.engines.base import VanillaEngine
    from workers.server.worker import ServerWorker

    _wrap(Connection, "buffer_updated", "Sread")
    _wrap(ZmtpRouter, "recv", "Srecv")
    _wrap(VanillaEngine, "handle", "Seng")
    _wrap(ZmtpRouter, "send_parts", "Ssend")
    _wrap(ServerWorker, "after_replies", "Ssettle")


def instrument_client() -> None:
    from workers.client.connection import ClientConnection
    from workers.client.steps import StepRunner

    _wrap(StepRunner, "train_step", "Cstep")
    _wrap(StepRunner, "cut", "Ccut")
    _wrap(StepRunner, "apply_gradient", "Capply")
    _wrap(ClientConnection, "send", "Csend")
    _wrap(ClientConnection, "_readable", "Cwait")


def serve_traced(config: str, out: str) -> int:
    """The server worker with stamps; SIGUSR2 writes them to ``out``."""
    from workers.cli import main as cli_main

    instrument_server()

    def dump(signum: int, frame: object) -> None:
        # whole or not at all: the tracer reads it as soon as it exists and is not empty (it
        # once read the first 8,192 bytes of a write still going on)
        partial = Path(f"{out}.partial")
        partial.write_text(json.dumps(STAMPS))
        os.replace(partial, out)

    signal.signal(signal.SIGUSR2, dump)
    return cli_main(["server", "--config", config])


def timeline(stamps: Sequence[Stamp]) -> dict[str, Any]:
    """Median microseconds of each piece over the steps that have all their edges (a step
    runs from one ``Cstep0`` to the next; the first stamp of each edge in it counts), the
    server's deferred update (``settle_us``) and its wait for the next request (``idle_us``).
    A piece can read negative: the server may read a message before the client's send
    returns, when ZeroMQ's I/O thread takes the client's core at once."""
    ordered = sorted(stamps, key=lambda s: s[1])
    steps: list[dict[str, int]] = []
    for edge, t in ordered:
        if edge == "Cstep0":
            steps.append({})
        if steps and edge not in steps[-1]:
            steps[-1][edge] = t
    for step in steps:
        if "Cwait1" not in step and "Csend1" in step and "Ssend1" in step:
            # The reply was queued before the client looked for it (its send returned after
            # the server had answered), so it never waited: it got to the reply then.
            step["Cwait1"] = max(step["Csend1"], step["Ssend1"])
    edges = [a for a, _, _ in PIECES] + [PIECES[-1][1]]
    whole = [s for s in steps if all(e in s for e in edges)]
    pieces = {
        what: median([(s[b] - s[a]) / 1e3 for s in whole]) if whole else None
        for a, b, what in PIECES
    }
    server = [(e, t) for e, t in ordered if e.startswith("S")]
    settle = _durations(server, "Ssettle0", "Ssettle1")
    idle = _durations(server, "Srecv0", "Sread0")
    return {
        "steps": len(whole),
        "pieces_us": pieces,
        "step_us": median([(s["Cstep1"] - s["Cstep0"]) / 1e3 for s in whole]) if whole else None,
        "settle_us": median(settle) if settle else None,
        "idle_us": median(idle) if idle else None,
    }


def _durations(stamps: list[Stamp], start: str, end: str) -> list[float]:
    """Microseconds from each ``start`` to the first ``end`` after it."""
    out, opened = [], None
    for edge, t in stamps:
        if edge == start:
            opened = t
        elif edge == end and opened is not None:
            out.append((t - opened) / 1e3)
            opened = None
    return out


async def client_steps(
    cfg: ClientConfig, base: Path, steps: int, server: subprocess.Popen[bytes], pin: bool
) -> int:
    """Warm up, then run ``steps`` traced steps; returns the clock when the first began."""
    from workers.client.worker import ClientWorker

    client = ClientWorker(cfg, base, progress=False)
    client.ctx = zmq.asyncio.Context()
    batches = batch_order(len(client.data.train), BATCH, 0, 0)
    cores = party_cores() if pin else None
    try:
        await client.connect()
        if cores is not None:  # after connecting: ZeroMQ's I/O thread moves with us
            pin_process(os.getpid(), {cores[0]})
            pin_process(server.pid, {cores[1]})
        for step in range(WARMUP):
            await train_step(client, step, batches[step % len(batches)])
        STAMPS.clear()
        started_ns = time.monotonic_ns()  # the server's stamps from here on are traced steps'
        for step in range(WARMUP, WARMUP + steps):
            await train_step(client, step, batches[step % len(batches)])
        traced = list(STAMPS)
        # One more step: the server handles requests in order, so once it answers this one
        # it has stamped every edge of the last traced step (its deferred update included).
        last = WARMUP + steps
        await train_step(client, last, batches[last % len(batches)])
        STAMPS[:] = traced
        server.send_signal(signal.SIGUSR2)
        return started_ns
    finally:
        if client.conn is not None:
            client.conn.close()
        client.ctx.term()


def trace(model: str, steps: int, pin: bool) -> dict[str, Any]:
    """Run ``steps`` traced steps of ``model``; :func:`timeline` of both processes' stamps."""
    instrument_client()
    every = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="sl-trace-") as tmp:
        folder = Path(tmp)
        server_toml, client_map = configs(folder, model)
        out = folder / "server.json"
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "bench.step_trace", "--serve", str(server_toml), str(out)]
        with (folder / "server.log").open("wb") as log:
            server = subprocess.Popen(
                command,
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=path),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            cfg = from_mapping(ClientConfig, client_map)
            started_ns = eventloop.run(client_steps(cfg, folder, steps, server, pin))
            wait_for(lambda: out.exists() and out.stat().st_size > 0, 30, "the server's stamps")
            server_stamps = [tuple(s) for s in json.loads(out.read_text()) if s[1] >= started_ns]
        finally:
            stop_process(server)
            pin_process(os.getpid(), every)
    result = timeline([*server_stamps, *STAMPS])  # type: ignore[list-item]
    return result | {"model": model, "pinned": pin and party_cores() is not None}


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}: median step {result['step_us']:.0f} us over {result['steps']} traced "
        f"steps ({'pinned' if result['pinned'] else 'free'}; load {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} cores)",
    ]
    for what, us in result["pieces_us"].items():
        lines.append(f"{us:>9.1f} us  {what}")
    lines.append(f"{result['settle_us']:>9.1f} us  server: deferred update after the reply")
    lines.append(f"{result['idle_us']:>9.1f} us  server: waiting for the next request")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_trace", description=__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="digits_cnn")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--free", action="store_true", help="no pinning: the scheduler's choice")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_traced(*args.serve)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    result = trace(args.model, args.steps, pin=not args.free)
    print(render(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
