"""Warnings a peer can cause at will are logged once per peer per interval (red team's a7
flood wrote 16,000 lines in 20 s), and the next line says how many were held back."""

from __future__ import annotations

import logging

import pytest

from workers.runtime.quietlog import QuietLog


def test_one_line_per_peer_per_interval_then_the_count_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a clock the test moves
    now = [0.0]
    quiet = QuietLog(logging.getLogger("test.quiet"), interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "test.quiet")
    # Execute: 1,000 refusals from one peer within the interval, one from another, then later
    logged = [
        quiet.warning("10.0.0.1", "rejected a message from %s", "10.0.0.1") for _ in range(1000)
    ]
    other = quiet.warning("10.0.0.2", "rejected a message from %s", "10.0.0.2")
    now[0] = 10.0
    again = quiet.warning("10.0.0.1", "rejected a message from %s", "10.0.0.1")
    # Assert
    assert logged.count(True) == 1 and other and again
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rejected a message from 10.0.0.1",
        "rejected a message from 10.0.0.2",
        "rejected a message from 10.0.0.1 (and 999 more from this peer in the last 10s)",
    ]
