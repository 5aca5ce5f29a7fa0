"""The connection gate's token checks, sans-IO: who gets in, replays, and the table's bound."""

from __future__ import annotations

from unittest import mock

from sl_pipeline import gate as gate_module
from sl_pipeline.gate import USERNAME, WINDOW_S, Gate, connect_token
from sl_pipeline.keys import generate_keypair

NOW = 1_800_000_000.0


def setup() -> tuple[Gate, object, object, bytes]:
    server, alice, bob = generate_keypair(), generate_keypair(), generate_keypair()
    return Gate(server, [alice.public, bob.public]), alice, bob, server.public


def test_an_admitted_token_opens_one_connection_and_its_copy_none() -> None:
    gate, alice, _, server = setup()
    token = connect_token(alice, server, NOW)  # type: ignore[arg-type]
    assert gate.check(USERNAME, token, NOW).reason == "ok"
    assert gate.check(USERNAME, connect_token(alice, server, NOW), NOW).key == alice.public  # type: ignore[attr-defined]
    assert gate.check(USERNAME, token, NOW + 1).reason == "replay"


def test_a_stranger_and_a_stale_token_are_refused() -> None:
    gate, alice, _, server = setup()
    stranger = generate_keypair()
    assert gate.check(USERNAME, connect_token(stranger, server, NOW), NOW).reason == "not_admitted"
    old = connect_token(alice, server, NOW - WINDOW_S - 5)  # type: ignore[arg-type]
    assert gate.check(USERNAME, old, NOW).reason == "stale"
    ahead = connect_token(alice, server, NOW + WINDOW_S + 5)  # type: ignore[arg-type]
    assert gate.check(USERNAME, ahead, NOW).reason == "stale"


def test_tokens_leave_the_table_when_they_leave_the_window() -> None:
    gate, alice, _, server = setup()
    for i in range(50):
        assert gate.check(USERNAME, connect_token(alice, server, NOW + i), NOW + i).reason == "ok"  # type: ignore[arg-type]
    assert len(gate) == 50
    later = NOW + 49 + WINDOW_S + 1
    assert gate.check(USERNAME, connect_token(alice, server, later), later).reason == "ok"  # type: ignore[arg-type]
    assert len(gate) == 1


def test_one_key_flooding_tokens_is_capped_and_leaves_the_others_alone() -> None:
    gate, alice, bob, server = setup()
    with mock.patch.object(gate_module, "MAX_TOKENS_PER_KEY", 20):
        verdicts = [
            gate.check(USERNAME, connect_token(alice, server, NOW), NOW).reason for _ in range(30)
        ]  # type: ignore[arg-type]
        assert verdicts == ["ok"] * 20 + ["rate"] * 10
        assert len(gate) == 20  # the refused ones took no place
        assert gate.check(USERNAME, connect_token(bob, server, NOW), NOW).reason == "ok"  # type: ignore[arg-type]
        later = NOW + WINDOW_S + 1
        assert gate.check(USERNAME, connect_token(alice, server, later), later).reason == "ok"  # type: ignore[arg-type]
