"""Training runs on one long-lived server: successive runs, isolated concurrent runs, and
one live session per client name."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.errors import PeerError
from sl_pipeline.messages import Kind
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment, wait_until

from .conftest import load_client, load_server


async def _serve(server: ServerWorker) -> tuple[asyncio.Event, asyncio.Task[Any]]:
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    for _ in range(100):
        if server.bound:
            break
        await asyncio.sleep(0.02)
    return stop, task


async def _train(files: dict[str, Path], names: list[str], *sets: str) -> list[dict[str, Any]]:
    base = files["server"].parent
    clients = [ClientWorker(load_client(files[n], *sets), base, progress=False) for n in names]
    return list(await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 120))


def _weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


async def test_one_server_serves_three_successive_runs(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=2, epochs=1)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop, task = await _serve(server)
    try:
        summaries = []
        for count in (1, 2, 3):  # a bye has no reply: wait until it ended the run
            summaries.append(await _train(files, ["client-1", "client-2"]))
            await wait_until(lambda n=count: _finished(server) == n)  # type: ignore[misc]
    finally:
        stop.set()
        await task
    runs = list(server.book.runs.values())
    assert [r.id for r in runs] == ["run-1", "run-2", "run-3"]
    for run, pair in zip(runs, summaries, strict=True):
        assert run.state == "finished"
        assert {s["run"] for s in pair} == {run.id}
        assert run.steps == sum(s["steps"] for s in pair) > 0
        assert run.members == {"client-1", "client-2"}
    # Each run keeps its own steps: every client's steps from (0, 0), each applied once.
    for run, pair in zip(runs, summaries, strict=True):
        expected = [[s["client"], 0, step] for s in pair for step in range(s["steps"])]
        assert sorted(run.applied_log) == sorted(expected)
        assert Path(run.model).parent.name == run.id and Path(run.model).exists()
    assert server.steps_applied == sum(r.steps for r in runs)
    # Each run has its own loss and accuracy series: the mean its clients reported
    metric = server.metrics.registry.get_sample_value
    for run, pair in zip(runs, summaries, strict=True):
        mean = sum(s["test_accuracy"] for s in pair) / 2
        assert run.info()["test_accuracy"] == pytest.approx(mean)
        assert metric("sl_run_test_accuracy_ratio", {"run": run.id}) == pytest.approx(mean)
        assert metric("sl_run_train_loss", {"run": run.id}) == pytest.approx(run.last_loss)


async def test_concurrent_named_runs_are_isolated(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=2, epochs=2)
    sets = ("server.run_clients=0",)
    alone = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(alone)
    try:
        await _train(files, ["client-1"], 'client.run="solo"')
    finally:
        stop.set()
        await task
    server = ServerWorker(
        load_server(files["server"], *sets, 'server.runs_dir="runs-b"'), files["server"].parent
    )
    stop, task = await _serve(server)
    try:
        base = files["server"].parent
        one = ClientWorker(load_client(files["client-1"], 'client.run="a"'), base, progress=False)
        two = ClientWorker(load_client(files["client-2"], 'client.run="b"'), base, progress=False)
        await asyncio.wait_for(asyncio.gather(one.run(), two.run()), 120)
        ends = server.book.runs  # the byes have no reply: wait until they ended both runs
        await wait_until(lambda: all(ends[r].state == "finished" for r in "ab" if r in ends))
    finally:
        stop.set()
        await task
    a, b = server.book.runs["a"], server.book.runs["b"]
    assert (a.members, b.members) == ({"client-1"}, {"client-2"})
    assert a.state == b.state == "finished"
    solo = _weights(alone.book.runs["solo"].model)
    for name, tensor in _weights(a.model).items():  # b trained beside it and changed nothing
        assert torch.allclose(tensor, solo[name], atol=1e-6), name


async def _join(files: dict[str, Path], *sets: str) -> ClientWorker:
    worker = ClientWorker(load_client(files["client-1"], *sets), files["server"].parent)
    worker.ctx = zmq.asyncio.Context()
    try:
        await worker.connect()
        await worker.request(worker.message(Kind.HEARTBEAT))  # the session proves itself
    except BaseException:
        _leave(worker)  # a context left to the garbage collector blocks in term()
        raise
    return worker


def _leave(*workers: ClientWorker) -> None:
    for worker in workers:
        if worker.conn is not None:
            worker.conn.close()
        if worker.ctx is not None:
            worker.ctx.destroy(linger=0)


async def test_a_live_name_is_refused_and_a_takeover_replaces_it(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=1)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop, task = await _serve(server)
    first = await _join(files)
    try:
        with pytest.raises(PeerError) as refused:
            await _join(files, "client.retry_for_s=0.3")
        assert refused.value.remote_code == "name_in_use"
        assert "client name 'client-1' is in use" in str(refused.value)
        assert "--takeover" in str(refused.value)
        second = await _join(files, "client.takeover=true")
        assert [p.name for p in server.peers.values()] == ["client-1"]  # the old one evicted
        _leave(second)
    finally:
        _leave(first)
        stop.set()
        await task


async def test_a_silent_name_is_free_again(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=1)
    cfg = load_server(files["server"], "server.takeover_after_s=0.2")
    server = ServerWorker(cfg, files["server"].parent)
    stop, task = await _serve(server)
    first = await _join(files)
    try:
        await asyncio.sleep(0.3)  # the old session's last message is older than 0.2 s
        second = await _join(files, "client.retry_for_s=0.3")
        _leave(second)
    finally:
        _leave(first)
        stop.set()
        await task


def _finished(server: ServerWorker) -> int:
    return sum(run.state == "finished" for run in server.book.runs.values())


def _a_run_finished(server: ServerWorker) -> bool:
    return any(run.state == "finished" for run in server.book.runs.values())


async def test_a_run_behind_a_relay_finishes(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1)
    # the client's bye travels without a reply through the relay: wait for it to arrive
    run = await run_deployment(files, until=_a_run_finished)
    (only,) = run.server.book.runs.values()
    assert only.members == only.done == {"relay-1/client-1"}  # the relay passed the bye on
    assert only.state == "finished" and Path(only.model).exists()


async def test_a_client_that_joined_to_infer_starts_no_run(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a trained run, then a client that only infers (no epochs left)
    files = deployment(dataset="breast_cancer", clients=1)
    server = ServerWorker(load_server(files["server"]), files["server"].parent)
    stop, task = await _serve(server)
    try:
        await _train(files, ["client-1"])
        worker = await _join(files, "train.epochs=0")
        try:
            # Execute: a training message from it
            with pytest.raises(PeerError) as refused:
                await worker.request(worker.message(Kind.FORWARD), timeout_s=10)
        finally:
            _leave(worker)
    finally:
        stop.set()
        await task
    # Assert: refused with the reason, and the finished run is still the only one
    assert "joined to infer" in str(refused.value)
    assert [(r.id, r.state) for r in server.book.runs.values()] == [("run-1", "finished")]


async def test_a_run_beyond_max_runs_waits_until_the_active_one_ends(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: room for one active run; client-1 trains run "a", client-2 asks for run "b"
    files = deployment(dataset="breast_cancer", clients=2, epochs=2)
    sets = ("server.max_runs=1", "server.run_clients=1")
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(server)
    base = files["server"].parent
    one = ClientWorker(load_client(files["client-1"], 'client.run="a"'), base, progress=False)
    two = ClientWorker(load_client(files["client-2"], 'client.run="b"'), base, progress=False)
    try:
        first = asyncio.create_task(one.run())
        await asyncio.wait_for(_until_run(server, "a"), 30)
        # Execute: "b" is asked for while "a" trains
        summaries = await asyncio.wait_for(asyncio.gather(first, two.run()), 120)
    finally:
        stop.set()
        await task
    # Assert: "b" was queued (refused as overloaded, retried) and began once "a" ended
    a, b = server.book.runs["a"], server.book.runs["b"]
    assert a.state == b.state == "finished"
    assert [s["run"] for s in summaries] == ["a", "b"] and two.retries > 0
    assert a.ended is not None and b.started >= a.ended
    assert (a.members, b.members) == ({"client-1"}, {"client-2"})


async def _until_run(server: ServerWorker, run_id: str) -> None:
    while run_id not in server.book.runs or not server.book.runs[run_id].steps:
        await asyncio.sleep(0.01)


async def test_a_run_active_at_a_clean_stop_keeps_its_model_after_a_restart(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a run that waits for two finished clients; only one trains
    files = deployment(dataset="breast_cancer", clients=2, epochs=1)
    sets = ("server.run_clients=2",)
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(server)
    try:
        await _train(files, ["client-1"])
    finally:
        stop.set()  # a clean stop: the active run's model is saved
        await task
    saved = server.book.runs["run-1"].model
    # Execute: the server starts again (from its checkpoint and runs.json)
    again = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    # Assert: the run is still active and still knows its saved model
    run = again.book.runs["run-1"]
    assert run.active and saved and run.model == saved and Path(saved).exists()
