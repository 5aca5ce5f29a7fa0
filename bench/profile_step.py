"""``python -m bench.profile_step [--model digits_cnn] [--steps 300]``: where a step's time goes.

Profiles the same split step ``bench.overhead`` times, in both processes: the real server
worker (``workers.cli.main``) under cProfile in a child process, switched on by SIGUSR1 after
the warm-up steps and written out on SIGUSR2, and the real :class:`ClientWorker` driven step
by step under cProfile in this process. Both profiles count each thread's own CPU time
(``time.thread_time``), not wall time: on a loaded machine wall time mostly measures waiting
for a core. Prints the median step time and each side's functions by own CPU time per step.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import zmq.asyncio

from sl_pipeline.config import ClientConfig, from_mapping
from sl_pipeline.data import batch_order
from workers.client.worker import ClientWorker
from workers.runtime import eventloop

from .common import REPO, median, stop_process, wait_for
from .models import BATCH, MODELS
from .overhead import configs, train_step


def serve_profiled(config: str, out: str) -> int:
    """The server worker, its main thread profiled between SIGUSR1 and SIGUSR2."""
    from workers.cli import main as cli_main

    profile = cProfile.Profile(time.thread_time)

    def stop(signum: int, frame: object) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, lambda signum, frame: profile.enable())
    signal.signal(signal.SIGUSR2, stop)
    return cli_main(["server", "--config", config])


def profiled_server(config: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "bench.profile_step", "--serve", str(config), str(out)]
    with log.open("wb") as fh:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=path),
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )


async def client_steps(
    cfg: ClientConfig,
    base: Path,
    steps: int,
    profile: cProfile.Profile,
    server: subprocess.Popen[bytes],
) -> list[float]:
    client = ClientWorker(cfg, base, progress=False)
    client.ctx = zmq.asyncio.Context()
    batches = batch_order(len(client.data.train), BATCH, 0, 0)
    samples = []
    try:
        await client.connect()
        for step in range(20):  # warm-up, not profiled
            await train_step(client, step, batches[step % len(batches)])
        server.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.2)  # let the server's handler run before the first profiled step
        for step in range(20, 20 + steps):
            start = time.perf_counter()
            profile.enable()
            await train_step(client, step, batches[step % len(batches)])
            profile.disable()
            samples.append(time.perf_counter() - start)
        server.send_signal(signal.SIGUSR2)
    finally:
        if client.conn is not None:
            client.conn.close()
        client.ctx.term()
    return samples


CATEGORIES = (  # (name, substrings of a function's file or name), first match wins
    ("crypto", ("aead", "cryptography", "session.py", "chunked.py")),
    ("codec+messages", ("codec.py", "messages.py", "json")),
    ("zmq+asyncio", ("zmq", "asyncio", "selectors", "select.epoll", "transport.py", "socket.py")),
    ("metrics", ("prometheus_client", "metrics.py")),
    ("torch", ("torch",)),
)


def budget(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """Own CPU time per step, in microseconds, summed by category."""
    totals = dict.fromkeys([name for name, _ in CATEGORIES] + ["other"], 0.0)
    for (file, _, name), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{file}:{name}"
        category = next((c for c, keys in CATEGORIES if any(k in where for k in keys)), "other")
        totals[category] += own / steps * 1e6
    totals["total"] = sum(totals.values())
    return {k: round(v, 1) for k, v in totals.items()}


def table(stats: pstats.Stats, steps: int, top: int) -> str:
    """The ``top`` functions by own time, in microseconds per step."""
    rows = []
    for (file, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((own, cum, calls, f"{Path(file).name}:{line}({name})"))
    rows.sort(reverse=True)
    lines = [f"{'own us/step':>12}{'cum us/step':>12}{'calls/step':>11}  function"]
    for own, cum, calls, where in rows[:top]:
        lines.append(
            f"{own / steps * 1e6:>12.1f}{cum / steps * 1e6:>12.1f}{calls / steps:>11.2f}  {where}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="digits_cnn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_profiled(*args.serve)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sl-profile-") as tmp:
        folder = Path(tmp)
        server_toml, client_map = configs(folder, args.model)
        server = profiled_server(server_toml, folder / "server.prof", folder / "server.log")
        profile = cProfile.Profile(time.thread_time)
        try:
            cfg = from_mapping(ClientConfig, client_map)
            samples = eventloop.run(client_steps(cfg, folder, args.steps, profile, server))
            wait_for(lambda: (folder / "server.prof").exists(), 30, "the server's profile")
        finally:
            stop_process(server)
        out = io.StringIO()
        print(
            f"{args.model}: median step {median(samples) * 1e3:.2f} ms over {len(samples)} steps "
            f"(profiled; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)",
            file=out,
        )
        client_stats = pstats.Stats(profile)
        print("\nclient process (this one), per step:", file=out)
        print(table(client_stats, len(samples), args.top), file=out)
        print(f"client CPU budget, us/step: {budget(client_stats, len(samples))}", file=out)
        if (folder / "server.prof").exists():
            server_stats = pstats.Stats(str(folder / "server.prof"))
            print("\nserver process, per step:", file=out)
            print(table(server_stats, len(samples), args.top), file=out)
            print(f"server CPU budget, us/step: {budget(server_stats, len(samples))}", file=out)
        else:
            print(
                "\nserver profile missing; log:\n" + (folder / "server.log").read_text()[-800:],
                file=out,
            )
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
