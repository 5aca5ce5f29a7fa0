"""Each group's admission is its own (``[server] groups``): peers (``server.max_clients``),
active runs (``server.max_runs``) and the hello rate are split between the groups, so one
group's enrolled keys, however many, busy or hostile, never take another group's places nor
spend its hellos. The rules are sans-IO (``Groups.shares``, ``PeerTable.check_place``,
``RunBook.check_capacity``, ``HelloRates``), tested here with names, bytes and a clock; the
last tests speak over real loopback sockets to a server bound in this process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq.asyncio
from prometheus_client import CollectorRegistry

from sl_pipeline.errors import ConfigError, OverloadedError, PeerError
from sl_pipeline.handshake import ClientHandshake, refused
from sl_pipeline.keys import load_keypair, load_public_key
from sl_pipeline.messages import Kind, Message
from sl_pipeline.tenancy import Groups
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.ops.clientseries import MAX_CLIENTS
from workers.ops.labels import RUN_SERIES
from workers.ops.metrics import WorkerMetrics
from workers.runtime.hellorates import HelloRates
from workers.runtime.peers import Listen, Peer, PeerTable
from workers.server.replycache import ReplyCache
from workers.server.runs import KEEP_ENDED, RunBook
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .conftest import load_client
from .test_hostile_numeric import serving
from .test_hostile_peers import hello_for
from .test_run_groups import _hello, _step

THREE = {"hospital": ["h1", "h2", "h3", "h4", "h5"], "bank": ["b1"], "shop": ["s1", "s2"]}
# client-1 and client-2 are the hospital's, client-3 the bank's
TWO = 'server.groups={hospital=["client-1", "client-2"], bank=["client-3"]}'


# ---- the split ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "total", "key", "expected"),
    [
        (THREE, 64, "max_clients", {"hospital": 5, "bank": 1, "shop": 2}),  # all fit
        (THREE, 4, "max_runs", {"bank": 1, "shop": 1, "hospital": 2}),  # evenly, smallest first
        (THREE, 6, "max_clients", {"bank": 1, "shop": 2, "hospital": 3}),  # bank's spare goes on
        (
            {**THREE, "shop": {"members": ["s1", "s2"], "max_runs": 3}},
            5,
            "max_runs",
            {"shop": 3, "bank": 1, "hospital": 1},
        ),
        ({"hospital": ["h1", "h2"]}, 64, "max_clients", {}),  # one group: the server's places
        ({"hospital": {"members": ["h1"], "max_runs": 2}}, 4, "max_runs", {"": 2}),
        ({}, 4, "max_runs", {}),
    ],
    ids=["all-fit", "even", "spare-goes-on", "own-share", "one-group", "one-group-own", "none"],
)
def test_groups_share_the_servers_places(
    raw: dict[str, Any], total: int, key: str, expected: dict[str, int]
) -> None:
    shares = Groups.from_config(raw).shares(total, key)
    assert shares == expected
    assert sum(shares.values()) <= total  # so a group's places are never another's


@pytest.mark.parametrize(
    ("raw", "total", "words"),
    [
        (
            {**THREE, "shop": {"members": ["s1", "s2"], "max_clients": 9}},
            8,
            r"the groups' max_clients add up to 9, over server\.max_clients = 8",
        ),
        (THREE, 2, r"3 groups without max_clients .* share the 2 place\(s\) server\.max_clients"),
    ],
    ids=["over-the-total", "a-group-left-without"],
)
def test_shares_that_cannot_hold_stop_the_server(
    raw: dict[str, Any], total: int, words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        Groups.from_config(raw).shares(total, "max_clients")


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"members": ["b1"], "max_clients": 0}, r"server\.groups\.bank\.max_clients = 0 must be"),
        ({"members": ["b1"], "max_runs": "2"}, r"server\.groups\.bank\.max_runs must be a whole"),
        ({"members": ["b1"], "max_runs": True}, r"server\.groups\.bank\.max_runs must be a whole"),
        ({"members": ["b1"], "max_peers": 2}, r"unknown key 'server\.groups\.bank\.max_peers'"),
    ],
    ids=["zero", "text", "bool", "unknown"],
)
def test_a_bad_group_quota_is_named(entry: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Groups.from_config({"bank": entry})


# ---- the rules, without sockets -----------------------------------------------------------
def _table(places: dict[str, int], max_peers: int = 2) -> PeerTable:
    listen = Listen("tcp://127.0.0.1:1", "", "", True, max_peers, 60.0, "server")
    table = PeerTable(listen, "server", "fp", {})
    table.group_of = lambda name: name[0]  # "a1" is group a's
    table.places = places
    return table


def _joined(table: PeerTable, *names: str, confirmed: bool = True) -> None:
    for i, name in enumerate(names):
        identity = f"{name}-{i}-{len(table.peers)}".encode()
        table.peers[identity] = Peer(name, None, "insecure", confirmed=confirmed)  # type: ignore[arg-type]


def test_a_group_that_holds_all_its_places_leaves_the_others_theirs() -> None:
    # Prepare: group a's two names hold its two places (confirmed), and a third is pending
    table = _table({"a": 2, "b": 1}, max_peers=3)
    _joined(table, "a1", "a2")
    # Execute / Assert: a's third name is refused; b's name still finds its place, and a
    # rejoin of a's own names is no newcomer
    with pytest.raises(OverloadedError, match=r"server is full \(2 peers \(group a's places"):
        table.check_place("a3")
    table.check_place("b1")
    table.check_place("a1")
    _joined(table, "b1")
    with pytest.raises(OverloadedError, match="group b's"):
        table.check_place("b2")


def test_pending_handshakes_of_one_group_lock_out_no_other() -> None:
    table = _table({"a": 2, "b": 1}, max_peers=3)
    _joined(table, "a1", "a2", confirmed=False)  # never send a message after their hello
    with pytest.raises(OverloadedError, match=r"unfinished handshakes \(group a's places\)"):
        table.check_place("a3")
    table.check_place("b1")


def test_without_places_every_name_shares_max_peers_as_before() -> None:
    table = _table({}, max_peers=2)
    _joined(table, "a1", "b1")
    with pytest.raises(OverloadedError, match=r"server is full \(2 peers\); retry later"):
        table.check_place("c1")


def test_a_groups_runs_hold_its_run_places_only() -> None:
    # Prepare: group a's one place holds a's run, and a's other run waits
    book = RunBook(None, max_runs=2, run_clients=0, empty_run_s=5.0, stalled_run_s=5.0)
    book.run_places = {"a": 1, "b": 1}
    first = book.start("x", None, None, owner="a1", group="a")  # type: ignore[arg-type]
    with pytest.raises(OverloadedError, match=r"1 runs are active \(group a's places: 1\)"):
        book.start("y", None, None, owner="a2", group="a")  # type: ignore[arg-type]
    # Execute: b starts its run; a's run goes idle
    book.start("x", None, None, owner="b1", group="b")  # type: ignore[arg-type]
    # Assert: a's idle or empty run gives a's place up, never b's run
    later = first.opened + 10.0
    assert book.expire_empty(later, "a") == [first]
    assert set(book.runs) == {"b:x"}
    assert book.idle_runs(later, "a") == [] and book.full("b")


def test_a_flood_from_one_key_spends_its_own_bucket_and_its_groups() -> None:
    # Prepare: burst 3, then 1 a second; keys a1, a2 are group a's, b1 group b's
    rates = HelloRates(1.0, 3)
    group = {b"a1": "a", b"a2": "a", b"b1": "b"}
    rates.group_of = group.get
    # Execute: a1 floods from the address every key comes from
    allowed = [rates.allow(b"a1", "127.0.0.1", 0.0) for _ in range(10)]
    # Assert: a1 had its burst; a2 has none left of a's bucket; b1 is not touched by either
    assert allowed == [True] * 3 + [False] * 7
    assert not rates.allow(b"a2", "127.0.0.1", 0.0)
    assert [rates.allow(b"b1", "127.0.0.1", 0.0) for _ in range(3)] == [True] * 3
    assert rates.allow(b"a2", "127.0.0.1", 1.0)  # a's bucket refilled
    with pytest.raises(OverloadedError, match=r"too many hellos from this connection's key"):
        rates.check(b"a1", "127.0.0.1", 1.0)


def test_without_a_gate_the_bucket_is_the_addresss() -> None:
    rates = HelloRates(1.0, 2)
    assert [rates.allow(None, "10.0.0.1", 0.0) for _ in range(3)] == [True, True, False]
    assert rates.allow(None, "10.0.0.2", 0.0)
    with pytest.raises(OverloadedError, match=r"too many hellos from 10\.0\.0\.1;"):
        rates.check(None, "10.0.0.1", 0.0)


# ---- over loopback ----------------------------------------------------------------------
async def _flood(
    server: ServerWorker,
    ctx: zmq.asyncio.Context,
    name: str,
    codes: list[str],
    stop: asyncio.Event,
) -> None:
    """``name``'s key says one hello again and again on a connection of its own, each time
    as soon as the last was answered (no pause), until ``stop`` is set; ``codes``: the answers.

    Stopped by a flag, not by cancelling: Python 3.11's ``asyncio.wait_for`` drops a
    cancellation that meets its inner future's completion, and with a reply always about to
    arrive that happened one run in eight, the flood then going on for the test's whole
    timeout."""
    keys = server.base / "keys"
    own, server_pub = load_keypair(keys / f"{name}.key"), load_public_key(keys / "server.pub")
    hs = ClientHandshake(hello_for(server.fingerprint, name), own, server_pub)
    conn = DealerConnection(ctx, server.cfg.server.bind)
    try:
        conn._connect(hs)  # its gate token; the hello then again and again (costs it nothing)
        hello = hs.start()
        while not stop.is_set():
            await conn.sock.send_multipart(hello)
            reply = await asyncio.wait_for(conn.sock.recv_multipart(), 10)
            error = refused(reply)
            codes.append(error.remote_code if error else "welcome")
    finally:
        conn.close()


async def test_a_group_b_client_trains_while_group_a_holds_its_places_and_floods(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: three places, two runs; the hospital (client-1, client-2) gets two places and
    # one run, the bank (client-3) one of each. Hellos: a burst of 5, then 2 a second.
    files = deployment(topology="vanilla", clients=3, dataset="breast_cancer")
    sets = (TWO, "server.max_clients=3", "server.max_runs=2", "server.run_clients=0")
    sets += ("server.hello_burst=5", "server.hellos_per_s=2")
    base = files["server"].parent
    async with serving(files, *sets) as (server, ctx, _):
        # the hospital's keys hold its places: client-1's run, client-2 joined
        c1, _ = await _hello(server, ctx, "client-1", "a-run")
        assert (await _step(server, c1)).kind is Kind.BACKWARD
        c2, _ = await _hello(server, ctx, "client-2", "b-run")
        with pytest.raises(PeerError) as second_run:
            await _step(server, c2)
        # and client-1's key floods hellos, from the address every client here comes from
        codes: list[str] = []
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(server, ctx, "client-1", codes, stop))
        try:
            hits = {"table": "hello_rate"}
            metric = server.metrics.registry.get_sample_value
            await wait_until(lambda: (metric("sl_bound_hits_total", hits) or 0) >= 5)
            # Execute: the bank's client joins and starts its run while the flood goes on
            # (a refused hello or run start would be retried for 5 s only, then end it),
            # then trains to its end
            bank = ClientWorker(
                load_client(files["client-3"], "client.retry_for_s=5"), base, progress=False
            )
            training = asyncio.create_task(bank.run())
            started = lambda: "bank:run-1" in server.book.runs or training.done()  # noqa: E731
            await wait_until(started, 120)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(flood, return_exceptions=True), 30)
        summary = await asyncio.wait_for(training, 120)
        # Assert: the bank trained its run; the hospital's second run waited in its own
        # place, and its flood was refused (overloaded) while the bank was admitted
        assert summary["steps"] > 0 and server.book.runs["bank:run-1"].members == {"client-3"}
        assert second_run.value.remote_code == "overloaded" and "group hospital's" in str(
            second_run.value
        )
        assert codes.count("overloaded") >= 5 and "welcome" not in codes
        c1.close()
        c2.close()


async def test_a_group_b_client_finds_its_place_when_group_a_holds_as_many_as_the_server(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two places on the server, and the hospital has two members: one place each
    files = deployment(topology="vanilla", clients=3, dataset="breast_cancer")
    async with serving(files, TWO, "server.max_clients=2") as (server, ctx, _):
        c1, _ = await _hello(server, ctx, "client-1")
        await c1.send(Message(Kind.HEARTBEAT))
        await c1.recv(10)  # confirmed: it holds its place
        # Execute: the hospital's second member, then the bank's client
        with pytest.raises(PeerError) as second:
            await _hello(server, ctx, "client-2")
        c3, welcome = await _hello(server, ctx, "client-3")
        # Assert: the hospital's second key waits (its group's place is taken); the bank's
        # client is in (before: "server is full (2 peers)" for the bank, the hospital in twice)
        assert second.value.remote_code == "overloaded" and "group hospital's" in str(second.value)
        assert welcome["run"] == "run-1"
        c1.close()
        c3.close()


def test_over_the_inflight_budget_the_group_holding_the_most_loses_its_biggest() -> None:
    # Prepare: group a's three keys each assemble 2 MiB; b's one key assembles 5 MiB
    table = _table({"a": 3, "b": 1}, max_peers=4)
    _joined(table, "a1", "a2", "a3", "b1")
    for peer in table.peers.values():
        peer.partial((5 if peer.name == "b1" else 2) * 2**20, now=1.0)
    # Execute / Assert: over a 10 MiB budget one of a's goes (a holds 6 MiB), not b's 5 MiB
    # (before: the biggest holder server-wide, b1)
    gone = table.over_budget(10 * 2**20)
    assert gone is not None and table.peers[gone].name.startswith("a")
    table.places = {}  # without groups' places: the biggest holder, as before
    assert table.peers[table.over_budget(10 * 2**20) or b""].name == "b1"


# ---- what one group's keys can do to another group's metrics ------------------------------
def test_another_groups_churn_of_runs_and_names_keeps_an_active_runs_and_clients_series() -> None:
    # Prepare: the bank's run trains, its client steps
    server = WorkerMetrics("server", CollectorRegistry())
    assert server.clients is not None
    server.record_run("bank:run-1", 3, True)
    server.clients.stepped("client-3", 3, 0)
    # Execute: the hospital's key starts and ends more runs than are kept, and its relay
    # names more clients behind it than are kept
    for i in range(RUN_SERIES + 5):
        server.record_run(f"hospital:r{i}", 1, True)
        server.record_run(f"hospital:r{i}", 1, False)
    for i in range(MAX_CLIENTS + 5):
        server.clients.started(f"relay-1/x{i}", connected=True)
    # Assert: the bank's series stay (before: both were pushed out); the oldest of the
    # hospital's own went, and what is exported stays bounded
    sample = server.registry.get_sample_value
    assert sample("sl_run_steps", {"run": "bank:run-1"}) == 3
    assert sample("sl_client_steps", {"client": "client-3"}) == 3
    assert sample("sl_run_steps", {"run": "hospital:r0"}) is None
    assert sample("sl_client_connected", {"client": "relay-1/x0"}) is None
    assert sample("sl_client_connected", {"client": f"relay-1/x{MAX_CLIENTS + 4}"}) == 1
    runs = {
        s.labels["run"] for m in server.registry.collect() for s in m.samples if "run" in s.labels
    }
    assert len(runs) == RUN_SERIES


def test_another_groups_churn_of_runs_leaves_the_book_bounded_and_a_groups_runs_listed() -> None:
    # Prepare: the bank's run ended first (the oldest of all)
    book = RunBook(None, max_runs=2, run_clients=0)
    book.run_places = {"hospital": 1, "bank": 1}
    book.end(book.start("trial", None, ReplyCache(), group="bank"), "finished")  # type: ignore[arg-type]
    # Execute: the hospital starts and ends more runs than a group's kept
    for i in range(KEEP_ENDED + 3):
        run = book.start(f"r{i}", None, ReplyCache(), group="hospital")  # type: ignore[arg-type]
        book.end(run, "finished")
    # Assert: the hospital's oldest left the book (what runs.json and each checkpoint hold);
    # the bank's run is still listed (before: every run was kept, without bound)
    assert "bank:trial" in book.runs and "hospital:r2" not in book.runs
    assert len(book.runs) == KEEP_ENDED + 1
