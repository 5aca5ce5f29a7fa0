"""Fault injection with real processes: kill -9, restarts, lost and delayed messages.

Each faulty run must finish with the same per-party step count as an uninterrupted run with
the same seed, the server's applied-step log must hold every step exactly once, and the
final accuracy must be within 0.01 of the uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from workers.checkpoint import CheckpointStore
from workers.lossy_proxy import LossyProxy

from .conftest import Procs
from .inprocess import run_deployment

SERVER_SETS = ("--set", 'checkpoint.dir="ckpt/server"', "--set", "checkpoint.fsync=false")
CLIENT_SETS = (
    "--set",
    'checkpoint.dir="ckpt/client"',
    "--set",
    "checkpoint.fsync=false",
    "--set",
    "client.retry_for_s=60",
    "--set",
    "client.timeout_s=10",
    "--set",
    "client.connect_timeout_s=2",
)


def _summary(proc: subprocess.Popen[str], timeout: float = 240) -> dict:  # type: ignore[type-arg]
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _applied_log(base: Path) -> list[tuple[str, int, int]]:
    found = CheckpointStore(base / "ckpt" / "server", prefix="server").load_latest()
    assert found is not None
    return [(str(c), int(e), int(s)) for c, e, s in found[0]["applied_log"]]


def _reference(deployment, epochs: int) -> dict:  # type: ignore[no-untyped-def,type-arg]
    files = deployment(dataset="digits", epochs=epochs)
    return asyncio.run(run_deployment(files))["summaries"][0]


def _wait_steps(proc_base: Path, at_least: int, timeout_s: float = 120) -> None:
    """Wait until the client has checkpointed ``at_least`` steps (training is under way)."""
    deadline = time.monotonic() + timeout_s
    store = CheckpointStore(proc_base / "ckpt" / "client", prefix="client-1")
    while time.monotonic() < deadline:
        files = store.list()
        if files and int(files[-1].stem.split("-")[-1]) >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"the client never reached step {at_least}")


@pytest.mark.slow
def test_server_killed_three_times(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    reference = _reference(deployment, epochs=4)
    files = deployment(dataset="digits", epochs=4)
    base = files["server"].parent
    server = procs.start("server", files["server"], *SERVER_SETS)
    client = procs.start("client", files["client-1"], "--json", "--no-progress", *CLIENT_SETS)
    for kill in range(3):
        _wait_steps(base, 30 * (kill + 1))
        assert client.poll() is None, "training ended before the fault"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        server = procs.start("server", files["server"], *SERVER_SETS)
    summary = _summary(client)
    server.send_signal(signal.SIGTERM)
    server.wait(15)
    log = _applied_log(base)
    assert summary["steps"] == reference["steps"]
    assert len(log) == len(set(log)) == reference["steps"]  # every step applied exactly once
    assert summary["retries"] >= 3
    assert abs(summary["test_accuracy"] - reference["test_accuracy"]) <= 0.01


@pytest.mark.slow
def test_client_killed_and_restarted(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    reference = _reference(deployment, epochs=3)
    files = deployment(dataset="digits", epochs=3)
    base = files["server"].parent
    server = procs.start("server", files["server"], *SERVER_SETS)
    client = procs.start("client", files["client-1"], "--json", "--no-progress", *CLIENT_SETS)
    _wait_steps(base, 50)
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    again = procs.start("client", files["client-1"], "--json", "--no-progress", *CLIENT_SETS)
    summary = _summary(again)
    server.send_signal(signal.SIGTERM)
    server.wait(15)
    log = _applied_log(base)
    assert summary["resumed_from"] >= 50
    assert len(log) == len(set(log)) == reference["steps"]
    assert abs(summary["test_accuracy"] - reference["test_accuracy"]) <= 0.01


async def test_lossy_network_loses_and_delays_messages(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=2)
    reference = (await run_deployment(deployment(dataset="breast_cancer", epochs=2)))["summaries"][
        0
    ]
    port = int(files["client-1"].read_text().split("tcp://127.0.0.1:")[1].split('"')[0])
    proxy = LossyProxy(f"tcp://127.0.0.1:{port}", drop_rate=0.05, delay_s=(0.0, 0.003), seed=3)
    await proxy.start()
    try:
        run = await run_deployment(
            files,
            f'client.server="{proxy.endpoint}"',
            "client.timeout_s=1",
            "client.connect_timeout_s=1",
            "client.retry_for_s=30",
        )
    finally:
        await proxy.stop()
    summary = run["summaries"][0]
    assert proxy.dropped > 0
    assert summary["steps"] == reference["steps"]
    assert run["server"].steps_applied == reference["steps"]  # nothing applied twice
    assert summary["retries"] > 0
    assert abs(summary["test_accuracy"] - reference["test_accuracy"]) <= 0.01
