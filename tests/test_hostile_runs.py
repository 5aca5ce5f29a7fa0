"""Run squatting (issue 15, B6): an admitted client cannot fill ``server.max_runs`` nor draw
an honest client into a run it named. A run starts on its first training message (never on
a hello), a client has one open run at a time and starts one active run at a time, and a
run with no applied step, or whose every client finished, gives its place up
``server.empty_run_s`` later when a new run needs it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.errors import OverloadedError, PeerError, ProtocolError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import load_keypair, load_public_key
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.server.runs import RunBook
from workers.server.runstarts import RELAY_SHARE, RunStarts
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .conftest import load_client, load_server
from .test_relay_runs import crash_after
from .test_runs import _serve


async def _honest(files: dict[str, Path]) -> dict[str, Any]:
    client = ClientWorker(load_client(files["client-1"]), files["server"].parent, progress=False)
    return dict(await asyncio.wait_for(client.run(), 120))


async def _hostile(
    server: ServerWorker, keys: Path, ctx: zmq.asyncio.Context, run: str
) -> DealerConnection:
    """client-2's admitted key, joining by hand under ``run`` (taking over its old session)."""
    hello = {
        "v": PROTOCOL_VERSION,
        "client": "client-2",
        "model": server.fingerprint,
        "role": "trainer",
        "run": run,
        "takeover": True,
    }
    conn = DealerConnection(ctx, server.cfg.server.bind)
    hs = ClientHandshake(
        hello, load_keypair(keys / "client-2.key"), load_public_key(keys / "server.pub")
    )
    await conn.handshake(hs, 10)
    return conn


async def _bogus_step(conn: DealerConnection) -> PeerError:
    """A training message that fails (activations of the wrong width): it applies nothing."""
    act = torch.zeros(4, 3)
    await conn.send(
        Message(
            kind=Kind.FORWARD, tensors={"act": act, "labels": torch.zeros(4, dtype=torch.int64)}
        )
    )
    with pytest.raises(PeerError) as refused:
        await conn.recv(10)
    return refused.value


async def test_an_admitted_key_squatting_runs_leaves_an_honest_client_training(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: what the honest client achieves alone; a server with room for one run
    sets = ("server.max_runs=1", "server.empty_run_s=1.0", "server.takeover_after_s=0.5")
    make = dict(clients=2, dataset="breast_cancer", epochs=1)
    files = deployment(**make)
    alone_server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(alone_server)
    try:
        alone = await _honest(files)
    finally:
        stop.set()
        await task
    files = deployment(**make)  # the same model and data; a fresh server state
    base = files["server"].parent
    server = ServerWorker(load_server(files["server"], *sets), base)
    stop, task = await _serve(server)
    ctx = zmq.asyncio.Context()
    try:
        # Execute: hellos under five run names; then a run named by a failing step; then
        # more names, and a run-N of its choice, each with a step
        for index in range(5):
            (await _hostile(server, base / "keys", ctx, f"squat-{index}")).close()
        hellos_left = dict(server.book.runs)
        conn = await _hostile(server, base / "keys", ctx, "squat-0")
        first = await _bogus_step(conn)
        conn.close()
        refusals = []
        for run in ("squat-1", "squat-2", "run-7"):
            conn = await _hostile(server, base / "keys", ctx, run)
            refusals.append(await _bogus_step(conn))
            conn.close()
        squatted = set(server.book.runs)
        honest = await _honest(files)
    finally:
        ctx.destroy(linger=0)
        stop.set()
        await task
    # Assert: hellos started nothing; the squatter held one (empty) run, which gave its place
    # up; the honest client trained in a run of its own exactly as alone
    assert hellos_left == {}
    assert first.remote_code != "overloaded" and squatted == {"squat-0"}
    assert all("one open run" in str(refusal) for refusal in refusals)
    assert set(server.book.runs) == {"run-1"}
    assert server.book.runs["run-1"].members == {"client-1"}
    assert honest["steps"] == alone["steps"] > 0
    assert honest["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=0.02)
    metric = server.metrics.registry.get_sample_value
    assert metric("sl_bound_hits_total", {"table": "empty_runs"}) == 1.0


def test_a_client_has_one_open_run_and_unnamed_clients_never_join_a_named_one() -> None:
    # Prepare: a run named by client-2, and an unnamed run of client-1's
    book = RunBook(None, max_runs=4, run_clients=0, empty_run_s=60.0)
    named = book.start("mine", engine=None, replies=None, owner="client-2")  # type: ignore[arg-type]
    # Execute / Assert: an unnamed client is never placed in it; its owner opens no other
    assert book.current_for("client-1") is None
    with pytest.raises(ProtocolError, match="one open run"):
        book.check_start(book.next_id(), "client-2")
    with pytest.raises(ProtocolError, match="run-N ids are the server's"):
        book.check_start("run-9", "client-1")
    current = book.start(book.next_id(), engine=None, replies=None, owner="client-1")  # type: ignore[arg-type]
    assert book.current_for("client-3") is current and named.named and not current.named
    # once client-2 finished its run it still holds it (it started it) while it is active
    named.done.add("client-2")
    with pytest.raises(OverloadedError, match="one active run"):
        book.check_start("another", "client-2")


def test_only_runs_that_applied_nothing_expire() -> None:
    book = RunBook(None, max_runs=2, run_clients=0, empty_run_s=5.0)
    empty = book.start("a", engine=None, replies=None, owner="x")  # type: ignore[arg-type]
    busy = book.start("b", engine=None, replies=None, owner="y")  # type: ignore[arg-type]
    busy.steps = 3
    now = time.monotonic()
    assert book.expire_empty(now) == []  # not yet 5 s old
    assert book.expire_empty(now + 5.0) == [empty] and set(book.runs) == {"b"}


def test_a_client_starts_one_active_run_finished_or_not() -> None:
    # Prepare: client-2 started run evil-1, trained in it and finished; it waits for one more
    book = RunBook(None, max_runs=4, run_clients=2, empty_run_s=5.0)
    evil = book.start("evil-1", engine=None, replies=None, owner="client-2")  # type: ignore[arg-type]
    evil.members.add("client-2")
    evil.steps = 3
    evil.done.add("client-2")
    # Execute / Assert: no second run of its own while that one is active; not idle yet
    with pytest.raises(OverloadedError, match="one active run"):
        book.check_start("evil-2", "client-2")
    book.check_start(book.next_id(), "client-1")  # another client still may
    assert book.idle_runs(evil.last_active + 4.0) == []
    assert book.idle_runs(evil.last_active + 5.001) == [evil]


async def test_finished_runs_of_one_client_never_fill_max_runs(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two places, a run ends when two clients finished (red team's a2_run_fill)
    sets = ("server.max_runs=2", "server.run_clients=2", "server.empty_run_s=1.0")
    files = deployment(clients=2, dataset="breast_cancer", epochs=1)
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(server)
    try:
        # Execute: client-2 trains one epoch in each of two runs it names, finishing each
        for name in ("evil-1", "evil-2"):
            cfg = load_client(files["client-2"], f"client.run={name}")
            client = ClientWorker(cfg, files["server"].parent, progress=False)
            await asyncio.wait_for(client.run(), 120)
        evil_active = [r.id for r in server.book.active() if r.owner == "client-2"]
        honest = await asyncio.wait_for(_honest(files), 120)
    finally:
        stop.set()
        await task
    # Assert: its first run gave its place up to its second; the honest client trained
    assert evil_active == ["evil-2"]
    assert server.book.runs["evil-1"].state == "stopped"
    assert honest["steps"] > 0 and server.book.runs["run-1"].members == {"client-1"}
    metric = server.metrics.registry.get_sample_value
    assert metric("sl_bound_hits_total", {"table": "idle_runs"}) == 1.0


def test_a_run_a_member_abandoned_is_idle_after_stalled_run_s() -> None:
    # Prepare: client-1 started the run and finished; client-2 stepped once and vanished
    book = RunBook(None, max_runs=4, run_clients=2, empty_run_s=5.0, stalled_run_s=50.0)
    run = book.start("run-1", engine=None, replies=None, owner="client-1")  # type: ignore[arg-type]
    run.members |= {"client-1", "client-2"}
    run.done.add("client-1")
    run.steps = 10
    # Execute / Assert: not after empty_run_s (a member has not finished), after stalled_run_s
    assert book.idle_runs(run.last_active + 49.0) == []
    # (not + 50.0 exactly: (t + 50.0) - t reads 49.999999999998 for some clock values t)
    assert book.idle_runs(run.last_active + 50.001) == [run]
    never = RunBook(None, max_runs=4, run_clients=2, empty_run_s=5.0, stalled_run_s=0.0)
    assert not never.idle(run, run.last_active + 1e9)  # 0 = never


async def test_a_vanished_co_client_cannot_hold_its_run_open_forever(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: run-1 ends when both clients finished; client-1 starts it, client-2 joins,
    # takes one step and vanishes (a crash, or a hostile member)
    files = deployment(clients=2, dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    # one place: client-1's new run needs run-1's (it no longer waits for run-1 itself,
    # which client-2 holds open: tests/test_run_lifecycle.py)
    sets = ("server.stalled_run_s=0.3", "server.takeover_after_s=0.5", "server.max_runs=1")
    server = ServerWorker(load_server(files["server"], *sets), base)
    stop, task = await _serve(server)
    try:
        honest = ClientWorker(load_client(files["client-1"]), base, progress=False)
        first = asyncio.ensure_future(honest.run())
        await wait_until(lambda: honest.steps_done >= 1)
        await crash_after(files["client-2"], base, steps=1)
        first_summary = await asyncio.wait_for(first, 120)
        # Execute: client-1 starts again while run-1 still waits for client-2
        second = await asyncio.wait_for(_honest(files), 120)
    finally:
        stop.set()
        await task
    # Assert: run-1 gave its place up once nobody stepped in it for 0.3 s; run-2 trained
    assert (first_summary["run"], second["run"]) == ("run-1", "run-2")
    assert server.book.runs["run-1"].state == "stopped"
    assert server.book.runs["run-1"].members == {"client-1", "client-2"}
    assert second["steps"] == first_summary["steps"] > 0
    metric = server.metrics.registry.get_sample_value
    assert metric("sl_bound_hits_total", {"table": "idle_runs"}) == 1.0


async def test_one_key_starting_and_finishing_runs_is_held_to_its_start_rate(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a run ends as soon as its one client finished; one start a minute per client
    # (the message red team's admitted key made 113 runs in 10 s, each a saved model)
    sets = ("server.run_clients=1", "server.run_starts_per_min=1")
    files = deployment(clients=2, dataset="breast_cancer", epochs=1)
    server = ServerWorker(load_server(files["server"], *sets), files["server"].parent)
    stop, task = await _serve(server)

    async def train(name: str, run: str) -> dict[str, Any]:
        cfg = load_client(files[name], f"client.run={run}", "client.retry_for_s=2")
        client = ClientWorker(cfg, files["server"].parent, progress=False)
        return dict(await asyncio.wait_for(client.run(), 120))

    try:
        # Execute: client-2 trains and finishes one run, then asks for a second at once
        first = await train("client-2", "churn-1")
        with pytest.raises(PeerError, match=r"server\.run_starts_per_min = 1") as refused:
            await train("client-2", "churn-2")
        honest = await train("client-1", "mine")  # another key's starts are its own
    finally:
        stop.set()
        await task
    # Assert: one run of client-2's, refused as retryable; the honest client unaffected
    assert first["steps"] > 0 and honest["steps"] > 0
    assert refused.value.remote_code == "overloaded" and "still refused after" in str(refused.value)
    assert [r.id for r in server.book.runs.values() if r.owner == "client-2"] == ["churn-1"]


def test_run_starts_per_client_refill_at_their_rate() -> None:
    starts = RunStarts(60.0)  # a burst of 60, then one a second
    for _ in range(60):
        starts.check("client-2", 100.0)
        starts.took("client-2", 100.0)
    with pytest.raises(OverloadedError, match="run_starts_per_min = 60"):
        starts.check("client-2", 100.5)
    starts.check("client-2", 101.0)
    starts.check("client-1", 100.0)  # another client's are its own
    unbounded = RunStarts(0.0)
    for _ in range(1000):
        unbounded.took("client-2", 100.0)
    unbounded.check("client-2", 100.0)  # 0: no bound


def test_a_relay_naming_new_clients_is_held_to_its_share_of_starts() -> None:
    # a relay names its clients itself: a hostile one (enrolled) invented a bucket per start
    starts = RunStarts(1.0)  # a client: one start; a relay's clients: 16 together
    for i in range(RELAY_SHARE):
        starts.check(f"relay-1/invented-{i}", 100.0)
        starts.took(f"relay-1/invented-{i}", 100.0)
    with pytest.raises(OverloadedError, match="clients behind relay relay-1 start runs faster"):
        starts.check("relay-1/invented-new", 100.0)
    starts.check("relay-2/client-1", 100.0)  # another relay's clients have their own share
    starts.check("client-1", 100.0)  # and a client of the server's own
    starts.check("relay-1/invented-new", 100.0 + 60.0 / RELAY_SHARE)  # it refills


async def test_clients_behind_one_relay_each_have_their_own_starts(deployment) -> None:  # type: ignore[no-untyped-def]
    # the bucket was the relay's: client-2's one start refused client-1, another key (red team)
    from .test_relay_runs import serving

    files = deployment(topology="multihop", dataset="breast_cancer", clients=2)
    base = files["server"].parent
    async with serving(files, "server.run_clients=1", "server.run_starts_per_min=1"):
        cfg = load_client(files["client-2"], "client.run=churn-1")
        first = await asyncio.wait_for(ClientWorker(cfg, base, progress=False).run(), 120)
        cfg = load_client(files["client-1"], "client.run=honest", "client.retry_for_s=3")
        honest = await asyncio.wait_for(ClientWorker(cfg, base, progress=False).run(), 120)
    assert first["steps"] > 0 and honest["steps"] > 0


async def test_unproven_names_share_their_addresss_starts(deployment) -> None:  # type: ignore[no-untyped-def]
    # --insecure: a name is claimed, not proven; five names from one address each started a
    # run under run_starts_per_min = 1 (red team); hellos were already counted by address
    files = deployment(clients=1, dataset="breast_cancer", epochs=1, insecure=True)
    base = files["server"].parent
    text = files["server"].read_text()  # no groups: any claimed name joins
    kept = [line for line in text.splitlines() if "groups" not in line]
    files["server"].write_text("\n".join(kept))
    sets = ("server.run_clients=1", "server.run_starts_per_min=1")
    server = ServerWorker(load_server(files["server"], *sets), base)
    stop, task = await _serve(server)
    try:
        cfg = load_client(files["client-1"], "client.name=evil-1", "client.retry_for_s=2")
        first = await asyncio.wait_for(ClientWorker(cfg, base, progress=False).run(), 120)
        cfg = load_client(files["client-1"], "client.name=evil-2", "client.retry_for_s=2")
        with pytest.raises(PeerError, match=r"address 127\.0\.0\.1 starts runs faster"):
            await asyncio.wait_for(ClientWorker(cfg, base, progress=False).run(), 120)
    finally:
        stop.set()
        await task
    assert first["steps"] > 0 and len(server.book.runs) == 1
