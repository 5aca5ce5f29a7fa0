"""Real worker processes over real loopback sockets (forked from a process that imported
torch once: ``Procs.fork``; tests/test_lifecycle.py starts them as an operator does)."""

from __future__ import annotations

import json
import signal

from .conftest import Procs, wait_for_files


def _summary(proc, timeout: float = 180) -> dict:  # type: ignore[no-untyped-def]
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_clients_train_against_one_server(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    files = deployment(clients=2, dataset="breast_cancer", epochs=3)
    procs.fork("server", files["server"])
    # Execute
    clients = [
        procs.fork("client", files[f"client-{i}"], "--json", "--no-progress") for i in (1, 2)
    ]
    summaries = [_summary(c) for c in clients]
    # Assert
    for s in summaries:
        assert s["steps"] > 0 and s["test_accuracy"] >= 0.85
        assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
    assert {s["client"] for s in summaries} == {"client-1", "client-2"}


def test_server_survives_a_client_killed_mid_epoch(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 trains long enough to be killed mid-epoch
    files = deployment(clients=2, dataset="digits", epochs=1)
    server = procs.fork("server", files["server"])
    ckpt = ("--set", 'checkpoint.dir="ckpt/victim"', "--set", "checkpoint.fsync=false")
    victim = procs.fork(
        "client", files["client-1"], "--json", "--no-progress", "--epochs", "50", *ckpt
    )
    ckpts = files["client-1"].parent / "ckpt" / "victim"
    wait_for_files(ckpts, "*.ckpt", 2, server, victim)  # mid-epoch
    # Execute
    victim.kill()
    victim.wait(10)
    survivor = procs.fork("client", files["client-2"], "--json", "--no-progress", "--epochs", "4")
    # Assert: the other client trains to the end against the same server
    summary = _summary(survivor)
    assert summary["steps"] == 4 * 23 and summary["test_accuracy"] > 0.7
    assert server.poll() is None


def test_killed_client_can_rejoin_under_its_name(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    server = procs.fork("server", files["server"])
    ckpt = ("--set", 'checkpoint.dir="ckpt/first"', "--set", "checkpoint.fsync=false")
    first = procs.fork(
        "client", files["client-1"], "--json", "--no-progress", "--epochs", "100", *ckpt
    )
    ckpts = files["client-1"].parent / "ckpt" / "first"
    wait_for_files(ckpts, "*.ckpt", 2, server, first)  # training
    first.kill()
    first.wait(10)
    again = procs.fork("client", files["client-1"], "--json", "--no-progress")
    assert _summary(again)["steps"] > 0


def test_sigterm_stops_a_client_cleanly_and_it_resumes(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="digits", epochs=3)
    sets = ("--set", 'checkpoint.dir="ckpt/client"', "--set", "checkpoint.fsync=false")
    server = procs.fork("server", files["server"])
    client = procs.fork("client", files["client-1"], "--json", "--no-progress", *sets)
    ckpt = files["client-1"].parent / "ckpt" / "client"
    wait_for_files(
        ckpt, "*.ckpt", 2, server, client
    )  # training is under way once checkpoints appear
    client.send_signal(signal.SIGTERM)
    stopped = _summary(client, timeout=30)
    assert stopped["stopped_early"] is True and 0 < stopped["steps"] < 135
    again = procs.fork("client", files["client-1"], "--json", "--no-progress", *sets)
    final = _summary(again)
    assert final["resumed_from"] == stopped["steps"]
    assert final["steps"] == 135 and final["stopped_early"] is False
