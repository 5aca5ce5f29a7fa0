"""Helpers every bench section shares: timing, child processes, keys, memory."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from sl_pipeline.keys import write_keypair
from workers.tools.localdeploy import free_port, to_toml

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 10.0
CTX = mp.get_context("spawn")  # fresh interpreters: no forked zmq contexts or torch threads

__all__ = ["CTX", "LOOPBACK", "REPO", "free_port", "to_toml"]


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("median of no samples")
    return float(statistics.median(values))


def paired(a: list[float], b: list[float]) -> dict[str, float | int]:
    """The ratio a/b as the median of per-pair ratios ``a[i] / b[i]``, with its spread.

    Each pair is measured back to back (interleaved A, B, A, B ...), so both sides of one pair
    see the same machine load; the median of the pair ratios ignores pairs disturbed by a
    burst of load, and the interquartile range (``q1``..``q3``) says how far pairs disagree.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need matched, non-empty pairs; got {len(a)} and {len(b)}")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    q1, q3 = (ratios[0], ratios[0]) if len(ratios) < 2 else _quartiles(ratios)
    return {"median": median(ratios), "q1": q1, "q3": q3, "iqr": q3 - q1, "pairs": len(ratios)}


def _quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def machine_load() -> dict[str, Any]:
    """How busy this machine is now: load averages (1, 5, 15 min) against its core count."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)], "cpus": os.cpu_count()}


def party_cores() -> tuple[int, int] | None:
    """Two cores for a two-party measurement (client, server), or None with fewer than two.

    Each party of a split step on its own core is what two hosts give; the one-process
    baseline then runs on the client's core alone, as it would on one of those hosts.
    """
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[-1]) if len(cores) >= 2 else None


def pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of process ``pid`` (this one's too) on ``cores`` from now on; threads
    started later inherit it from the thread that starts them."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (OSError, ValueError):  # the thread ended under us
            continue


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of process ``pid`` so far, in seconds, to the nanosecond
    (``/proc/PID/task/*/schedstat``; ``/proc/PID/stat`` counts in 10 ms ticks). A thread
    that ended meanwhile drops out, so take it around blocks of one thread set."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread ended under us
            continue
    return total / 1e9


def endpoint(port: int) -> str:
    return f"tcp://{LOOPBACK}:{port}"


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, budget_s: float) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    Stops early (keeping at least 3 samples) once ``budget_s`` has passed.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.monotonic() + budget_s
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if len(samples) >= 3 and time.monotonic() > deadline:
            break
    return samples


def start_child(target: Callable[..., Any], *args: Any) -> BaseProcess:
    proc = CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def stop_child(proc: BaseProcess, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Join within a bound; then SIGTERM, then SIGKILL. Never leaves the child running."""
    proc.join(timeout_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout_s)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def worker_process(role: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """A real ``python -m workers ROLE --config F`` process, importable ``bench`` on its path."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", role, "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )


def listening_worker(role: str, config: Path, log: Path, url: str) -> subprocess.Popen[bytes]:
    """:func:`worker_process`, returned once ``url`` (its ``tcp://HOST:PORT``) takes a
    connection: a client started beside a worker still importing torch timed its first hello
    out after 1 s, and said so, on every run."""
    proc = worker_process(role, config, log)
    host, port = url.removeprefix("tcp://").rsplit(":", 1)

    def listening() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"the {role} exited ({proc.returncode}) before listening: {tail}")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except OSError:
            return False
        return True

    try:
        wait_for(listening, 120, f"the {role} to listen on {url}")
    except BaseException:
        stop_process(proc)
        raise
    return proc


def write_keys(folder: Path, clients: list[str]) -> dict[str, str]:
    """Server identity plus one admitted identity per client name; relative paths for TOML."""
    keys = folder / "keys"
    admitted = keys / "admitted"
    admitted.mkdir(parents=True, exist_ok=True)
    write_keypair("server", keys)
    for name in clients:
        _, pub = write_keypair(name, keys)
        (admitted / pub.name).write_bytes(pub.read_bytes())
    return {
        "server_key": "keys/server.key",
        "server_pub": "keys/server.pub",
        "admitted": "keys/admitted",
    }


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` (VmRSS from /proc/PID/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)
