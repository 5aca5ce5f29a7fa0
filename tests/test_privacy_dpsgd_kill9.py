"""A DP-SGD client under a server killed with ``kill -9``, as processes (red team of the
DP-SGD accounting claim). The server checkpoints every 4 steps; it stops itself once it has
applied the client's whole epoch (15 steps, 13 checkpointed: the client sees the replies and
goes on to evaluate) and is killed while stopped, then started again. The client rewinds to
its 13th step and redoes two: all 15 draws and the 2 redone ones were released, and its
``dpsgd_epsilon`` is the accountant's for 17 steps at rate 1/15 (2.9411 at noise 1, delta
1e-5; 15 alone would be 2.8504). Before, the client, rewound during its evaluation, stopped
on Opacus' "pop from empty list" traceback."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from .conftest import Procs
from .workerproc import StopBehind, WorkerProcess

SERVER = ("--set", "checkpoint.every_steps=4", "--set", "server.takeover_after_s=0.3")
CLIENT = (
    "--json",
    "--no-progress",
    "--set",
    "client.retry_for_s=90",
    "--set",
    "privacy.dpsgd.noise_multiplier=1",
    "--set",
    "train.batch_size=32",
)


def _wait_stopped(server: WorkerProcess, client: WorkerProcess) -> None:
    deadline = time.monotonic() + 180
    while not server.stopped():
        assert server.poll() is None, server.log.read_text()[-3000:]
        assert client.poll() is None, client.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the server never stopped behind its checkpoint"
        time.sleep(0.02)


def _summary(proc: WorkerProcess) -> dict[str, Any]:
    assert proc.wait(240) == 0, proc.log.read_text()[-3000:]
    return dict(json.loads(proc.out.read_text().strip().splitlines()[-1]))


def test_every_released_step_counts_once_across_a_server_kill(
    deployment,  # type: ignore[no-untyped-def]
    procs: Procs,
) -> None:
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    base = files["server"].parent

    def start(name: str, extra: tuple[str, ...], stop: StopBehind | None = None) -> WorkerProcess:
        role = name.split("-")[0]
        stem = base / f"{name}-{len(procs.procs)}"
        argv = [role, "--config", str(files[name]), *extra]
        proc = WorkerProcess(argv, stem.with_suffix(".out"), stem.with_suffix(".log"), stop)
        procs.procs.append(proc)  # type: ignore[arg-type]  # stopped like a Popen
        return proc

    server = start("server", SERVER, StopBehind(at=15, lead=2))
    client = start("client-1", CLIENT)
    # Execute: kill -9 once the server holds 2 steps its checkpoints lack, then restart it
    _wait_stopped(server, client)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    start("server", SERVER)
    summary = _summary(client)
    # Assert: one rewind of two steps; the epsilon of every step released
    assert summary["rewinds"] == 1
    assert summary["steps"] == 15
    assert summary["dpsgd_epsilon"] == 2.9411
