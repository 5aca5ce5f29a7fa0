"""A client's part of a run across restarts, from the third red team (runs on a long-lived
server): a finish survives a server restart, a resumed client never trains on in a run other
than its checkpoint's, a member that never finishes holds neither its run's owner off new
runs nor a second place, and the stale-step refusal names what works. In-process, over real
loopback sockets; every wait is for an event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sl_pipeline.errors import ConfigError, PeerError, ProtocolError, TransportError
from workers.client.worker import ClientWorker
from workers.server.runs import RunBook
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .conftest import load_client, load_server
from .test_relay_runs import serving
from .test_runs import _serve

DATA = dict(clients=2, dataset="breast_cancer", epochs=1)  # 8 steps per client and epoch
NONE = 'checkpoint.dir=""'  # a client without [checkpoint] dir (init writes one)


@contextlib.asynccontextmanager
async def _serving(files: dict[str, Path], *sets: str) -> AsyncIterator[ServerWorker]:
    """A server on the deployment's config and state, in this event loop, for the block."""
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(server)
    try:
        yield server
    finally:
        stop.set()
        await task


async def _client(files: dict[str, Path], name: str, *sets: str) -> dict[str, Any]:
    client = ClientWorker(load_client(files[name], *sets), files["server"].parent, progress=False)
    return dict(await asyncio.wait_for(client.run(), 120))


async def _crash(files: dict[str, Path], name: str, steps: int, *sets: str) -> ClientWorker:
    """A client that applies ``steps`` steps and ends without a goodbye (kill -9)."""
    client = ClientWorker(load_client(files[name], *sets), files["server"].parent, progress=False)
    task = asyncio.ensure_future(client.run())
    counted = client._done

    def cancelled_at_steps(*args: Any, **kwargs: Any) -> None:
        # from its own step, not a poll: a reply already queued is taken without yielding,
        # and a 10 ms poll once saw a client run its whole epoch (13 steps in 0.1 s)
        counted(*args, **kwargs)
        if client.steps_done >= steps:
            task.cancel()  # lands at its next wait

    client._done = cancelled_at_steps  # type: ignore[method-assign]
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 120)
    if not task.cancelled():  # it ended first: its own error now, not a wait that times out
        raise AssertionError(f"{name} ended before {steps} steps: {task.result()}")
    return client


async def _client_on_a_new_server(
    files: dict[str, Path], sets: tuple[str, ...], *client_sets: str
) -> tuple[ServerWorker, dict[str, Any]]:
    """A server started (again) on the deployment's state, and client-1 run against it."""
    async with _serving(files, *sets) as server:
        return server, await _client(files, "client-1", *client_sets)


async def test_a_finish_survives_a_server_restart(deployment) -> None:  # type: ignore[no-untyped-def]
    """Red team A1: restarted from its checkpoint, the server had forgotten that client-1
    finished run-1 (still waiting for client-2): client-1 started again was bound to run-1
    and got its 8 steps from run-1's cache in 0.5 s, reported as trained."""
    # Prepare: client-1 finishes its part of run-1; the server stops and starts again
    files = deployment(**DATA)
    sets = ("server.run_clients=2", "server.empty_run_s=0.3")
    async with _serving(files, *sets) as first_server:
        first = await _client(files, "client-1")
        await wait_until(lambda: "client-1" in first_server.book.runs["run-1"].done)
    # Execute: client-1 again
    server, again = await _client_on_a_new_server(files, sets)
    # Assert: run-1 still knows it finished; the new steps trained a new run
    assert server.book.runs["run-1"].done == {"client-1"}
    assert server.book.runs["run-1"].owner == "client-1"  # so it gave its place up first
    assert server.book.runs["run-1"].state == "stopped"
    assert (first["run"], again["run"]) == ("run-1", "run-2")
    assert server.from_cache == 0 and server.book.runs["run-2"].steps == again["steps"] == 8


async def test_a_member_that_never_finishes_holds_neither_the_owner_nor_a_second_place(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    """Red team A5/A6: client-2 joined client-1's run and never finished (trickling a step
    now and then keeps the run from stalling): client-1 could start no run while it lasted,
    and client-2 could join a second run and hold that place too."""
    # Prepare: client-1 trains run-1 to its end; client-2 takes one step in it and vanishes
    files = deployment(**DATA)
    sets = ("server.run_clients=2", "server.stalled_run_s=3600", "server.max_runs=2")
    async with _serving(files, *sets) as server:
        honest = ClientWorker(load_client(files["client-1"]), files["server"].parent)
        honest.progress = False
        first = asyncio.ensure_future(honest.run())
        await wait_until(lambda: honest.steps_done >= 1)
        await _crash(files, "client-2", 1, NONE)  # it asks as a fresh client would
        await asyncio.wait_for(first, 120)
        # Execute: client-1 asks for a new run; client-2 asks to train in it too
        again = await _client(files, "client-1", "client.retry_for_s=3")
        with pytest.raises(PeerError, match="already trains in run 'run-1'"):
            await _client(files, "client-2", "client.run=run-2", "client.takeover=true", NONE)
    # Assert: client-1 trained run-2 at once; client-2 is a member of run-1 only
    assert again["run"] == "run-2" and again["steps"] == 8
    assert server.book.runs["run-1"].active and "client-2" in server.book.runs["run-1"].members
    assert server.book.runs["run-2"].members == {"client-1"}


def test_one_open_run_holds_for_joining_as_for_starting() -> None:
    book = RunBook(None, max_runs=4, run_clients=0)
    first = book.start("a", engine=None, replies=None, owner="client-1")  # type: ignore[arg-type]
    first.members |= {"client-1", "client-2"}
    other = book.start("b", engine=None, replies=None, owner="client-3")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="one open run"):
        book.check_join(other, "client-2")
    book.check_join(first, "client-2")  # its own run
    first.done.add("client-1")  # the owner finished, client-2 has not: client-2 holds it
    assert book.owned_run("client-1") is None and book.held(first)
    first.done.add("client-2")
    assert book.owned_run("client-1") is first
    book.check_join(other, "client-2")


async def test_a_checkpoint_of_a_run_that_ended_is_refused_not_trained_on(deployment) -> None:  # type: ignore[no-untyped-def]
    """Red team A3: a client with [checkpoint] dir killed 3 steps into run-1, run-1 stopped
    by an operator, started again: it trained on in run-2 and reported 8 steps there, of
    which run-2 applied 5."""
    files = deployment(**DATA)
    ckpt = ("checkpoint.dir=state/c1",)
    # run-1 waits for client-2: it gives its place up to run-2 empty_run_s later (60 s)
    async with _serving(files, "server.empty_run_s=0.5") as server:
        await _crash(files, "client-1", 3, *ckpt)
        server.stop_run("run-1")
        # Execute: the same command again
        with pytest.raises(ConfigError) as refused:
            await _client(files, "client-1", *ckpt)
    # Assert: one line naming the run, the folder and what to do; no run-2 trained
    assert "of run run-1, which the server no longer trains it in" in refused.value.message
    assert "move those files away" in refused.value.message
    assert "client-1-*.ckpt" in refused.value.message  # its own: not the others in that folder
    assert "\n" not in refused.value.message, repr(refused.value.message)
    assert "run-2" not in server.book.runs


async def test_a_finished_checkpoint_starts_a_new_run_it_really_trains(deployment) -> None:  # type: ignore[no-untyped-def]
    """Red team A2: restarted after it finished, a client with [checkpoint] dir reported its
    8 steps as trained in run-2 (a run that never existed) in 0.014 s. Its finished run's
    checkpoint now starts the next run from the start, as without one (init's clients have
    one): every step it reports, that run applied."""
    files = deployment(**DATA)
    ckpt = ("checkpoint.dir=state/c1",)
    # run-1 waits for client-2: it gives its place up to run-2 empty_run_s later (60 s)
    async with _serving(files, "server.empty_run_s=0.5") as server:
        first = await _client(files, "client-1", *ckpt)
        again = await _client(files, "client-1", *ckpt)
    assert (first["run"], again["run"]) == ("run-1", "run-2") and again["resumed_from"] == 0
    assert server.book.runs["run-1"].steps == first["steps"] == 8
    assert server.book.runs["run-2"].steps == again["steps"] == 8


async def test_the_stale_step_refusal_names_what_works(deployment) -> None:  # type: ignore[no-untyped-def]
    """Red team A4: its advice, "train a new run ([client] run = a new name)", was refused
    in turn (one open run at a time)."""
    files = deployment(**{**DATA, "epochs": 6})  # 48 steps: more than the cache keeps
    # a crashed session holds its name takeover_after_s (5 s) before the next may join
    sets = ("server.run_clients=0", "server.takeover_after_s=0.5")
    async with _serving(files, *sets) as server:
        await _crash(files, "client-1", 20, NONE)
        with pytest.raises(PeerError) as refused:
            await _client(files, "client-1", NONE)
        # Execute: what it says
        server.stop_run("run-1")
        again = await _client(files, "client-1", NONE)
    assert refused.value.remote_code == "stale_step"
    assert "`sl-pipeline runs stop run-1`" in str(refused.value)
    assert again["run"] == "run-2" and again["steps"] == 48


async def _stopped_while_training(files: dict[str, Path], server: ServerWorker) -> PeerError:
    """client-1 trains; 5 steps in, the operator stops run-1; what client-1 is told."""
    client = ClientWorker(load_client(files["client-1"]), files["server"].parent)
    client.progress = False
    training = asyncio.ensure_future(client.run())
    await wait_until(lambda: client.steps_done >= 5)
    server.stop_run("run-1")
    with pytest.raises(PeerError) as refused:
        await asyncio.wait_for(training, 120)
    return refused.value


@pytest.mark.parametrize("topology", ["vanilla", "multihop"])
async def test_a_run_stopped_while_its_client_trains_refuses_its_next_step(
    deployment,  # type: ignore[no-untyped-def]
    topology: str,
) -> None:
    """Red team A10/A12: `runs stop run-1` while client-1 trained (directly, or behind a
    relay): its next step started run-2 (fresh server weights) and it trained on there,
    reporting 2,400 steps in run-1, which had applied 332 (510 behind the relay)."""
    files = deployment(**{**DATA, "epochs": 30, "topology": topology})
    sets = ("server.run_clients=0",)
    if topology == "vanilla":
        async with _serving(files, *sets) as server:
            refused = await _stopped_while_training(files, server)
    else:
        async with serving(files, *sets) as deployed:
            server = deployed.server
            refused = await _stopped_while_training(files, server)
    # Assert: refused in one line naming the run; no run started by its next step
    assert refused.remote_code == "run_ended" and "run 'run-1' has stopped" in str(refused)
    assert list(server.book.runs) == ["run-1"]
    # and it names this client's checkpoints to move first: "start the client again" alone
    # was refused next, "move that folder away" (a journey review), with client-2's in it
    assert "first move this client's checkpoints" in str(refused)
    assert "client-1-*.ckpt" in str(refused) and "\n" not in str(refused)


def test_a_client_without_a_run_name_goes_back_to_the_run_it_has_open(deployment) -> None:  # type: ignore[no-untyped-def]
    """Red team A13: after a server restart (which forgets whom it bound where), client-1,
    open in run-1, was bound to the newer run-2: its stop state was removed as of an ended
    run (836 steps lost, exit 2), or with [checkpoint] dir it trained on in run-2 and
    reported 2,400 steps there."""
    files = deployment(**DATA)
    ungrouped = "server.groups={}"  # client-3, admitted nowhere here, is in the one group
    server = ServerWorker(load_server(files["server"], ungrouped), files["server"].parent)
    first = server.book.start("run-1", engine=None, replies=None, owner="client-1")  # type: ignore[arg-type]
    first.members |= {"client-1", "client-2"}
    first.done.add("client-2")
    second = server.book.start("run-2", engine=None, replies=None, owner="client-2")  # type: ignore[arg-type]
    second.members.add("client-2")
    assert server._current_run("client-1") is first
    assert server._current_run("client-2") is second
    assert server._current_run("client-3") is second  # the current run-N, as before
    if server.ckpt is not None:
        server.ckpt.release()


async def test_a_client_that_lost_its_server_carries_on_once_it_is_back(deployment) -> None:  # type: ignore[no-untyped-def]
    """Red team A14: a client whose server froze mid-run ended (exit 5) asking whether it
    had the ops port, saved nothing, and the same command later was refused as stale."""
    files = deployment(**{**DATA, "epochs": 6})  # 48 steps
    base, sets = files["server"].parent, ("server.run_clients=0",)
    server = ServerWorker(load_server(files["server"], *sets), base)
    stop, task = await _serve(server)
    client = ClientWorker(load_client(files["client-1"], "client.retry_for_s=1", NONE), base)
    client.progress = False
    training = asyncio.ensure_future(client.run())
    try:
        await wait_until(lambda: client.steps_done >= 20)
    finally:
        stop.set()  # the server goes away mid-run
        await task
    with pytest.raises(TransportError) as lost:
        await asyncio.wait_for(training, 60)
    assert "stopped answering" in lost.value.message and "ops" not in lost.value.message
    assert len(list((base / "state").glob("client-1.stopped-*.ckpt"))) == 1
    # Execute: the server is back; the same command
    server, again = await _client_on_a_new_server(files, sets, NONE)
    # Assert: it carried on in run-1; each step applied once
    run = server.book.runs["run-1"]
    assert again["run"] == "run-1" and 20 <= again["resumed_from"] < again["steps"] == 48
    assert run.state == "finished" and run.steps == 48


async def test_a_dpsgd_client_restarted_without_its_state_is_refused_not_fed_other_rows(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    """Red team A15: a DP-SGD client (batches from the OS) killed -9 nine steps in and
    started again resent its steps with other rows; the cached gradients failed it with a
    traceback (`Mismatch in shape`, exit 1), or, where the sizes agreed, were applied."""
    files = deployment(**{**DATA, "epochs": 4})
    dp = ("privacy.dpsgd.noise_multiplier=1.0", NONE)
    sets = ("server.run_clients=0", "server.takeover_after_s=0.3")  # the old session's name
    async with _serving(files, *sets) as server:
        await _crash(files, "client-1", 3, *dp)
        with pytest.raises(ConfigError) as refused:
            await _client(files, "client-1", *dp)
    assert "DP-SGD batches cannot be drawn again" in refused.value.message
    assert "`sl-pipeline runs stop run-1`" in refused.value.message
    assert server.from_cache == 0 and server.book.runs["run-1"].steps >= 3
