"""A long-lived server watched in Grafana, as an operator runs it: run after run on one
server process, a SIGTERM restart in the middle of a run, and what the server's per-client
series (the dashboard's "Runs and clients" row, ``SLClientLost``) say across it.

Each test here is a break an operator met walking through README.md and docs/deploy.md
(2026-11-30): a second run with more epochs refused, and a restarted server that counted its
clients' steps from 0 and could no longer see a client that never came back. In-process
over real loopback sockets; every wait is for an event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .conftest import load_server
from .test_run_lifecycle import _client, _crash, _serving

DATA = dict(clients=2, dataset="breast_cancer", epochs=1)  # 8 steps per client and epoch


def _series(registry: CollectorRegistry, name: str, client: str) -> float | None:
    return registry.get_sample_value(name, {"client": client})


async def test_a_finished_client_trains_a_longer_next_run(deployment) -> None:  # type: ignore[no-untyped-def]
    """The long-lived case: run-1 done, the operator asks for more epochs in the next run
    (`--set train.epochs=150`). init's client checkpoint of its finished run-1 (epoch 1 of
    1) was taken for a run-1 stopped in epoch 2 of 2: exit 2, "this client's checkpoint is
    of run run-1, which the server no longer trains it in ... move that folder away"."""
    files = deployment(**DATA)
    async with _serving(files, "server.run_clients=0") as server:
        first = await _client(files, "client-1")
        # Execute: the same client, the same checkpoint folder, twice the epochs
        again = await _client(files, "client-1", "train.epochs=2")
    # Assert: a new run from the start, every step it reports applied there
    assert (first["run"], first["steps"]) == ("run-1", 8)
    assert (again["run"], again["resumed_from"], again["steps"]) == ("run-2", 0, 16)
    assert server.book.runs["run-2"].steps == 16


async def test_a_restarted_server_still_sees_each_member_of_its_run(deployment) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM, then the same command, in the middle of run-1: client-1 had finished its
    part, client-2 was 3 steps in. The restarted server exported no sl_client_* series
    until a client's next step (so ``SLClientLost`` could never fire for a member that did
    not come back), and then counted its steps from 0 (1,154 of 3,450 on the dashboard)."""
    files = deployment(**DATA)
    sets = ("server.run_clients=2", "server.empty_run_s=3600")
    async with _serving(files, *sets) as first_server:
        await _client(files, "client-1")
        await wait_until(lambda: "client-1" in first_server.book.runs["run-1"].done)
        crashed = await _crash(files, "client-2", 3)  # killed: no bye, no stop
    # Read once the server has stopped: a forward the killed client had sent may still be
    # applied after the kill (it was, under load: 4 steps where 3 were read just after it)
    applied = first_server.book.runs["run-1"].client_steps["client-2"]
    assert applied >= crashed.steps_done >= 3
    # Execute: the server starts again on its checkpoint; client-2 has not come back yet
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    registry = server.metrics.registry
    # Assert: both members are there, neither joined: client-2 is a lost client, client-1 not
    assert _series(registry, "sl_client_connected", "client-2") == 0
    assert _series(registry, "sl_client_finished", "client-2") == 0
    assert _series(registry, "sl_client_steps", "client-2") == applied
    assert _series(registry, "sl_client_connected", "client-1") == 0
    assert _series(registry, "sl_client_finished", "client-1") == 1
    assert _series(registry, "sl_client_steps", "client-1") == 8
    assert server.ckpt is not None
    server.ckpt.release()  # its lock: the server below opens the same checkpoints
    # Execute: client-2's same command on the restarted server
    async with _serving(files, *sets) as server:
        done = await _client(files, "client-2")
        registry = server.metrics.registry
        await wait_until(lambda: server.book.runs["run-1"].state == "finished")
    # Assert: its steps count on from where the first server left them, to the run's end
    assert done["run"] == "run-1" and done["steps"] == 8
    assert _series(registry, "sl_client_steps", "client-2") == 8
    assert _series(registry, "sl_client_finished", "client-2") == 1


async def test_a_run_stopped_by_the_operator_loses_no_client(deployment) -> None:  # type: ignore[no-untyped-def]
    """client-2 was killed mid-run; the operator gave up on it: `sl-pipeline runs stop
    run-1`. Its sl_client_connected 0 and sl_client_finished 0 stayed as they were, so
    ``SLClientLost`` kept firing for a run that no longer existed, until that name joined
    again (on a long-lived server, maybe never)."""
    files = deployment(**DATA)
    # a silent peer is dropped after client_timeout_s: 1 s, not the default 120 s
    sets = ("server.run_clients=2", "server.empty_run_s=3600", "server.client_timeout_s=1")
    async with _serving(files, *sets) as server:
        await _client(files, "client-1")
        await _crash(files, "client-2", 3)
        registry = server.metrics.registry
        await wait_until(lambda: _series(registry, "sl_client_connected", "client-2") == 0)
        assert _series(registry, "sl_client_finished", "client-2") == 0  # lost: the alert
        # Execute: what an operator does about a client that will not come back
        server.stop_run("run-1")
        # Assert: its part of that run is over; nobody is lost any more
        assert _series(registry, "sl_client_finished", "client-2") == 1
        assert _series(registry, "sl_client_finished", "client-1") == 1
