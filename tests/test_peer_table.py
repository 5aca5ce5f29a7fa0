"""The admission and peer-table rules of a listening worker, driven with bytes: no socket."""

from __future__ import annotations

from typing import Any, cast

import pytest

from sl_pipeline.errors import NotAdmittedError, OverloadedError, ProtocolError, ReplayError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import Channel
from workers.runtime.peers import (
    CONFIRM_TIMEOUT_S,
    PENDING_PER_NAME,
    Listen,
    Peer,
    PeerTable,
    hello_refusal,
)

FP = "model-fp"
KEYS = {b"key-a": "site-a", b"key-b": "site-b", b"key-r": "relay-1"}


def table(max_peers: int = 2, peer_timeout_s: float = 120.0) -> tuple[PeerTable, list[str]]:
    bounds: list[str] = []
    listen = Listen(
        bind="tcp://127.0.0.1:1",
        key="k",
        admitted="a",
        insecure=False,
        max_peers=max_peers,
        peer_timeout_s=peer_timeout_s,
        section="server",
        relays=frozenset({"relay-1"}),
    )
    return PeerTable(listen, "server", FP, dict(KEYS), bounds.append), bounds


def peer(name: str, last_seen: float = 0.0, confirmed: bool = False) -> Peer:
    return Peer(name, cast(Channel, None), "fp", last_seen=last_seen, confirmed=confirmed)


def hello(**fields: Any) -> dict[str, Any]:
    return {"model": FP, **fields}


def test_the_name_comes_from_the_admitted_key_not_from_the_hello() -> None:
    peers, _ = table()
    assert peers.check_admission(hello(client="site-b"), b"key-a") == "site-a"


def test_an_insecure_peer_must_claim_a_printable_short_name() -> None:
    peers, _ = table()
    assert peers.check_admission(hello(client="lab-7"), None) == "lab-7"
    for bad in ("x" * 65, "tab\there", 7):
        with pytest.raises(ProtocolError, match="printable name"):
            peers.check_admission(hello(client=bad), None)


def test_another_model_or_topology_is_refused() -> None:
    peers, _ = table()
    with pytest.raises(ProtocolError, match="model/topology mismatch"):
        peers.check_admission({"model": "other"}, b"key-a")


def test_a_full_table_refuses_newcomers_but_lets_a_name_rejoin() -> None:
    # Prepare
    peers, _ = table(max_peers=1)
    peers.add(b"id-1", peer("site-a", confirmed=True))
    # Execute / Assert
    with pytest.raises(OverloadedError, match="full"):
        peers.check_admission(hello(), b"key-b")
    assert peers.check_admission(hello(), b"key-a") == "site-a"


def test_too_many_pending_names_refuse_the_newcomer_and_count_a_bound() -> None:
    peers, bounds = table(max_peers=2)
    peers.add(b"id-1", peer("site-a"))
    peers.add(b"id-2", peer("relay-1"))
    with pytest.raises(OverloadedError, match="unfinished handshakes"):
        peers.check_admission(hello(), b"key-b")
    assert bounds == ["pending_handshakes"]


def test_one_names_pending_sessions_count_once_and_lock_no_other_name_out() -> None:
    # Prepare: site-a holds as many unconfirmed sessions as a name may (red team's a4 flood)
    peers, bounds = table(max_peers=2)
    for index in range(PENDING_PER_NAME + 3):
        for gone in peers.add(bytes([index]), peer("site-a")):
            del peers.peers[gone]
    # Execute / Assert: site-b is admitted; site-a holds one place, not PENDING_PER_NAME
    assert peers.check_admission(hello(), b"key-b") == "site-b"
    assert sum(not p.confirmed for p in peers.peers.values()) == PENDING_PER_NAME
    assert bounds == []


def test_pending_sessions_of_one_name_are_bounded_oldest_first() -> None:
    peers, _ = table()
    evicted = [peers.add(bytes([i]), peer("site-a")) for i in range(PENDING_PER_NAME + 2)]
    assert evicted[:PENDING_PER_NAME] == [[]] * PENDING_PER_NAME
    assert evicted[PENDING_PER_NAME] == [bytes([0])]
    assert peers.add(b"other", peer("site-b")) == []  # another name's pending is never pushed


def test_a_confirmed_session_replaces_the_names_older_ones_and_nobody_else() -> None:
    peers, _ = table()
    peers.add(b"old", peer("site-a", confirmed=True))
    peers.add(b"b", peer("site-b", confirmed=True))
    peers.add(b"new", peer("site-a"))
    assert peers.confirm(b"new") == [b"old"]
    assert peers.peers[b"new"].confirmed


def test_silent_sessions_are_found_and_an_unconfirmed_one_sooner() -> None:
    peers, _ = table(peer_timeout_s=120.0)
    peers.add(b"quiet", peer("site-a", last_seen=0.0, confirmed=True))
    peers.add(b"joining", peer("site-b", last_seen=0.0))
    assert peers.silent(CONFIRM_TIMEOUT_S + 1) == [(b"joining", CONFIRM_TIMEOUT_S + 1)]
    assert [i for i, _ in peers.silent(121.0)] == [b"quiet", b"joining"]


def test_only_a_configured_relay_speaks_for_others() -> None:
    peers, _ = table()
    msg = Message(kind=Kind.FORWARD, client="client-1")
    assert peers.speaker(peer("relay-1"), msg) == "relay-1/client-1"
    assert peers.speaker(peer("site-a"), msg) == "site-a"


def test_a_refused_hello_is_labelled_for_the_metrics() -> None:
    assert hello_refusal(NotAdmittedError("who?")) == ("not_admitted", "not_admitted")
    assert hello_refusal(OverloadedError("full")) == ("bad_handshake", "overloaded")
    assert hello_refusal(ReplayError("again")) == ("bad_handshake", "replay")
    assert hello_refusal(ProtocolError("odd")) == ("bad_handshake", "other")
