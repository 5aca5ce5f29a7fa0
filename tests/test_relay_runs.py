"""A relay serving run after run, when one of its clients never finishes (red team, relay
round): a client that starts afresh is never answered from an earlier run's replies."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.errors import PeerError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.client.link import make_handshake
from workers.client.worker import ClientWorker
from workers.tools.inprocess import build_deployment, wait_until

from .conftest import load_client


@contextlib.asynccontextmanager
async def serving(
    files: dict[str, Any], *server_overrides: str, relay: Sequence[str] = ()
) -> AsyncIterator[Any]:
    """The server and the relay in this event loop, stopped when the block ends."""
    run = build_deployment(files, server_overrides=server_overrides, relay_overrides=relay)
    stop = asyncio.Event()
    services = [asyncio.ensure_future(run.server.serve(stop))]
    try:
        await wait_until(run.server.ready)
        services.append(asyncio.ensure_future(run.relay.serve(stop)))
        await wait_until(run.relay.ready)
        yield run
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), 30)


def count_joins(relay: Any) -> list[str]:
    """The clients each of the relay's joins of the server speaks for, from now on."""
    joins: list[str] = []
    join = relay._join_upstream

    async def counted(speaking_for: str = "") -> Any:
        joins.append(speaking_for)
        return await join(speaking_for)

    relay._join_upstream = counted
    return joins


async def crash_after(config: Path, base: Path, steps: int) -> None:
    """Run a client until it has applied ``steps`` steps, then end it without a goodbye."""
    client = ClientWorker(load_client(config), base, progress=False)
    task = asyncio.ensure_future(client.run())
    await wait_until(lambda: client.steps_done >= steps)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_client_starting_afresh_in_a_run_held_open_is_refused_not_fed_old_replies(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: two clients behind one relay; client-2 takes one step and vanishes (a crash,
    # or a hostile member), so run-1 stays open; client-1 trains it to the end
    files = deployment(topology="multihop", dataset="breast_cancer", clients=2)
    base = files["server"].parent
    async with serving(files) as run:
        await crash_after(files["client-2"], base, steps=1)
        first = await asyncio.wait_for(
            ClientWorker(load_client(files["client-1"]), base, progress=False).run(), 120
        )
        applied = (run.relay.steps_applied, run.server.steps_applied)
        # Execute: client-1 starts afresh, while run-1 waits for client-2
        again = ClientWorker(load_client(files["client-1"]), base, progress=False)
        with pytest.raises(PeerError) as refused:
            await asyncio.wait_for(again.run(), 120)
        # Assert: one clear refusal; no step answered from run-1's replies or applied again
        assert "a relay trains one run at a time" in str(refused.value)
        assert str(refused.value).count("peer error [run_ended]") == 1  # the relay adds none
        assert "runs stop run-1" in str(refused.value)
        assert again.steps_done == 0 and first["steps"] > 0
        assert (run.relay.steps_applied, run.server.steps_applied) == applied
        assert [(r.id, r.active) for r in run.server.book.runs.values()] == [("run-1", True)]


async def test_malformed_steps_after_fresh_hellos_never_make_the_relay_rejoin_the_server(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: an admitted client that says hello afresh, then sends a malformed step, again
    # and again (each pair used to make the relay join the server once more)
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1)
    cfg = load_client(files["client-1"])
    handshake = make_handshake(cfg, files["server"].parent, "multihop")
    ctx = zmq.asyncio.Context()
    async with serving(files) as run:
        joins = count_joins(run.relay)
        try:
            for attempt in range(20):  # bounded
                conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
                handshake.hello = {**handshake.hello, "resume": None}
                await conn.handshake(handshake, 10.0)
                bad = Message(
                    Kind.FORWARD,
                    client=cfg.client.name,
                    epoch=0,
                    step=attempt,
                    tensors={"act": torch.zeros(1, 1)},
                )
                await conn.send(bad)
                with pytest.raises(PeerError):
                    await conn.recv(10.0)
                conn.close()
        finally:
            ctx.destroy(linger=0)
        # Assert: the server was never asked again, and no step was applied
        assert joins == [] and run.relay.steps_applied == 0


async def test_a_client_restarted_within_its_run_is_answered_once_through_the_relay(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a client without checkpoints dies a few steps into its run
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1, epochs=2)
    base = files["server"].parent
    async with serving(files) as run:
        await crash_after(files["client-1"], base, steps=4)
        # Execute: it starts again from nothing and resends the steps it had taken
        again = await asyncio.wait_for(
            ClientWorker(load_client(files["client-1"]), base, progress=False).run(), 120
        )
        # Assert: every step applied once at the relay, as at the server
        assert again["steps"] > 0
        assert run.relay.steps_applied == run.server.steps_applied


async def test_a_run_held_open_behind_a_relay_gives_way_once_it_stalled(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: as above (client-2 takes one step and vanishes, client-1 trains run-1 to the
    # end), with a server whose runs count as stalled after 0.3 s without a step or finish
    files = deployment(topology="multihop", dataset="breast_cancer", clients=2)
    base = files["server"].parent
    async with serving(files, "server.stalled_run_s=0.3") as run:
        await crash_after(files["client-2"], base, steps=1)
        first = await asyncio.wait_for(
            ClientWorker(load_client(files["client-1"]), base, progress=False).run(), 120
        )
        book = run.server.book
        await wait_until(lambda: book.idle(book.runs["run-1"], time.monotonic()))
        # Execute: client-1 starts afresh
        second = await asyncio.wait_for(
            ClientWorker(load_client(files["client-1"]), base, progress=False).run(), 120
        )
    # Assert: run-1 gave its place up; the second run trained in run-2, every step applied
    # at the server (none answered from run-1's replies at the relay or the server)
    assert (first["run"], second["run"]) == ("run-1", "run-2")
    assert [(r.id, r.state) for r in book.runs.values()] == [
        ("run-1", "stopped"),
        ("run-2", "active"),  # waits for client-2 (server.run_clients = 2)
    ]
    assert book.runs["run-2"].steps == second["steps"] == first["steps"] > 0


async def fresh_start_then_step(ctx: Any, cfg: Any, handshake: Any, act_shape: Any) -> str:
    """Say hello without a resume point, send a well-formed step (0, 0): "" if it was
    answered, else the refusal."""
    conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
    try:
        handshake.hello = {**handshake.hello, "resume": None}
        await conn.handshake(handshake, 10.0)
        tensors = {"act": torch.zeros(4, *act_shape), "labels": torch.zeros(4, dtype=torch.long)}
        await conn.send(
            Message(Kind.FORWARD, client=cfg.client.name, epoch=0, step=0, tensors=tensors)
        )
        await conn.recv(10.0)
        return ""
    except PeerError as exc:
        assert exc.retryable
        return str(exc)
    finally:
        conn.close()


async def test_fresh_starts_over_and_over_make_the_relay_rejoin_a_bounded_number_of_times(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: client-1's key says hello afresh and sends a well-formed step, again and again
    # (each pair made the relay join the server again: 80 joins a second, unbounded)
    files = deployment(topology="multihop", dataset="breast_cancer", clients=2)
    cfg = load_client(files["client-1"])
    handshake = make_handshake(cfg, files["server"].parent, "multihop")
    ctx = zmq.asyncio.Context()
    bound = ("relay.rejoin_burst=3", "relay.rejoins_per_s=0.01")
    async with serving(files, relay=bound) as run:
        joins = count_joins(run.relay)
        try:  # Execute: 12 fresh starts (bounded), then an honest client behind the relay
            refusals = [
                await fresh_start_then_step(ctx, cfg, handshake, run.relay.act_shape)
                for _ in range(12)
            ]
        finally:
            ctx.destroy(linger=0)
        honest = await asyncio.wait_for(
            ClientWorker(
                load_client(files["client-2"]), files["server"].parent, progress=False
            ).run(),
            120,
        )
        hits = run.relay.metrics.registry.get_sample_value(
            "sl_bound_hits_total", {"table": "relay_rejoins"}
        )
    # Assert: three joins for client-1 (the burst), then one clear retryable refusal each;
    # client-2 trained its epoch, every step applied once at the relay as at the server
    assert joins.count("client-1") == 3 and refusals[:3] == ["", "", ""]
    assert len(refusals[3:]) == hits == 9
    assert all("[overloaded]" in r and "relay.rejoins_per_s" in r for r in refusals[3:])
    assert all("\n" not in r for r in refusals)
    assert honest["steps"] > 0 and joins.count("client-2") == 1
    assert run.relay.steps_applied == run.server.steps_applied == honest["steps"] + 1
