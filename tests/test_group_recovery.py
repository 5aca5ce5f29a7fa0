"""Group topologies survive a server `kill -9` (issue 20): the round-robin turn, the sealed
weights, the order, the run and the waiting list are in the server's checkpoint.

The server is killed while client-2 trains its first turn (client-1 is waiting for its next
one) and restarted; both clients must finish with exit 0, the same steps as an uninterrupted
run, every step applied once, and the same accuracy within 0.01, without waiting out the
900 s turn timeout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from workers.runtime.appliedlog import decode_log
from workers.runtime.checkpoint import CheckpointStore
from workers.tools.inprocess import run_deployment

from .conftest import Procs
from .workerproc import WorkerProcess

BATCH = "train.batch_size=8"  # a turn of ~90 steps: long enough to kill the server inside it
SERVER_SETS = ("--set", 'checkpoint.dir="ckpt/server"', "--set", "checkpoint.fsync=false")
CLIENT_SETS = (
    "--json",
    "--no-progress",
    "--set",
    BATCH,
    "--set",
    'checkpoint.dir="ckpt/client"',
    "--set",
    "checkpoint.fsync=false",
    "--set",
    "client.retry_for_s=60",
    "--set",
    "client.connect_timeout_s=2",
)


def _start(procs: Procs, files: dict[str, Path], name: str, *extra: str) -> WorkerProcess:
    """A worker forked from a process that imported torch already (seconds saved each)."""
    role = "server" if name == "server" else "client"
    stem = files["server"].parent / f"{name}-{len(procs.procs)}"
    argv = [role, "--config", str(files[name]), *extra]
    proc = WorkerProcess(argv, stem.with_suffix(".out"), stem.with_suffix(".log"))
    procs.procs.append(proc)  # type: ignore[arg-type]  # stopped like a Popen
    return proc


def _summary(proc: WorkerProcess, timeout_s: float = 240) -> dict[str, Any]:
    code = proc.wait(timeout_s)
    assert code == 0, f"exit {code}: {proc.log.read_text()[-3000:]}"
    return dict(json.loads(proc.out.read_text().strip().splitlines()[-1]))


def _client_steps(base: Path, name: str) -> int:
    """The client's newest checkpoint step, read from file names only: a CheckpointStore
    here would remove the temp files of the client's checkpoint being written."""
    steps = [
        int(p.stem.rsplit("-", 1)[-1]) for p in (base / "ckpt" / "client").glob(f"{name}-*.ckpt")
    ]
    return max(steps, default=0)


def _wait_for(what: str, ready: Any, procs: list[WorkerProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"a worker ended before {what}: {proc.log.read_text()[-2000:]}"
                )
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _server_run(base: Path) -> dict[str, Any]:
    """The one run in the server's newest checkpoint."""
    found = CheckpointStore(base / "ckpt" / "server", prefix="server").load_latest()
    assert found is not None
    (run,) = found[0]["runs"]
    return dict(run)


@pytest.mark.slow
def test_roundrobin_survives_a_server_kill_during_client_2s_turn(  # type: ignore[no-untyped-def]
    deployment, procs: Procs
) -> None:
    # Prepare: the uninterrupted run
    options = {"topology": "roundrobin", "clients": 2, "dataset": "digits", "epochs": 1}
    reference = asyncio.run(run_deployment(deployment(**options), BATCH)).summaries
    files = deployment(**options)
    base = files["server"].parent
    server = _start(procs, files, "server", *SERVER_SETS)
    clients = [_start(procs, files, n, *CLIENT_SETS) for n in ("client-1", "client-2")]
    # Execute: kill -9 the server once client-2 is 20 steps into its first turn
    _wait_for("client-2's turn", lambda: _client_steps(base, "client-2") >= 20, clients, 180)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    state = _server_run(base)["engine"]["group"]
    assert state["turn"] == 1 and list(state["waiting"]) == ["client-1"]  # mid-turn, for real
    started = time.monotonic()
    server = _start(procs, files, "server", *SERVER_SETS)
    summaries = [_summary(c) for c in clients]
    server.send_signal(signal.SIGTERM)
    server.wait(15)
    # Assert
    assert time.monotonic() - started < 120  # nobody waited out a turn timeout
    log = [tuple(e) for e in decode_log(_server_run(base)["applied_log"])]
    for got, want in zip(summaries, reference, strict=True):
        assert got["steps"] == want["steps"]
        assert abs(got["test_accuracy"] - want["test_accuracy"]) <= 0.01
    assert len(log) == len(set(log)) == sum(s["steps"] for s in reference)
    assert summaries[1]["retries"] >= 1  # client-2 did lose the server
