"""What the server's checkpoint interval costs: CPU per training step, and reply-first.

A server that checkpoints every step (``checkpoint.every_steps = 1``, what ``init`` and
``provision`` write) makes every applied step durable before its reply leaves: nothing is
ever lost and no client needs undo points, but every step pays a checkpoint write, and
reply-first (``server.reply_first``) never applies, because the update must be in the
checkpoint first. With ``every_steps = N`` the server writes one checkpoint per N steps and
replies first in between, and each client keeps N + depth + 1 undo points in memory
(``workers/client/rollback.py``).

One server and one client run in this process (real sockets, real encryption), on digits,
``fsync = false`` as ``init`` writes it. The figure is the process's CPU time per step (server
and client together), which a busy machine disturbs far less than wall time; each setting's
median over repeats is reported as a ratio to the run without checkpoints.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sl_pipeline.config import ClientConfig, ServerConfig, load
from workers.client.worker import ClientWorker
from workers.runtime import eventloop
from workers.server.worker import ServerWorker
from workers.tools.localdeploy import init_deployment

SETTINGS: tuple[int | None, ...] = (1, 10, 100, None)  # every_steps; None: no checkpoints


async def _one_run(every: int | None, epochs: int) -> tuple[float, int, int]:
    """(CPU ms per step, steps replied first, steps) of one run at ``every``."""
    with tempfile.TemporaryDirectory() as tmp:
        files = init_deployment(Path(tmp) / "d", dataset="digits", clients=1, epochs=epochs)
        paths = {k: Path(v) for k, v in files["files"].items()}
        sets = ['checkpoint.dir=""'] if every is None else [f"checkpoint.every_steps={every}"]
        base = paths["server"].parent
        server = ServerWorker(load(ServerConfig, paths["server"], sets), base)
        # the server's cost alone: the client keeps no checkpoints (init gives it some)
        client_cfg = load(ClientConfig, paths["client-1"], ['checkpoint.dir=""'])
        client = ClientWorker(client_cfg, base, progress=False)
        stop = asyncio.Event()
        serving = asyncio.create_task(server.serve(stop))
        start = time.process_time()
        try:
            summary = await asyncio.wait_for(client.run(), 600)
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
        cpu_ms = (time.process_time() - start) * 1000
        steps = int(summary["steps"])
        return cpu_ms / steps, int(server.summary()["replied_first"]), steps


def run(quick: bool = False) -> dict[str, Any]:
    repeats, epochs = (2, 2) if quick else (5, 4)
    per_step: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for _ in range(repeats):  # settings interleaved: a burst of load hits them all alike
        for every in SETTINGS:
            name = "none" if every is None else f"every_{every}"
            cpu, replied_first, steps = eventloop.run(_one_run(every, epochs))
            per_step.setdefault(name, []).append(cpu)
            first[name] = replied_first / steps
    medians = {name: statistics.median(values) for name, values in per_step.items()}
    return {
        "cpu_ms_per_step": {k: round(v, 2) for k, v in medians.items()},
        "cpu_ratio_to_none": {k: round(v / medians["none"], 2) for k, v in medians.items()},
        "replied_first_fraction": {k: round(v, 2) for k, v in first.items()},
        "repeats": repeats,
    }


__all__ = ["run"]
