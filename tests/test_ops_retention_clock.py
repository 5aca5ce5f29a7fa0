"""Ended runs' retention by age (``server.keep_ended_for_s``) against a wall clock that
jumps: a real server and client over loopback, the process's wall clock set forward two
days between two runs (a VM resumed, NTP stepping a clock, ``date -s``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from workers.server import retiring
from workers.server.retention import DAY_S
from workers.tools.inprocess import wait_until

from .test_run_lifecycle import _client, _serving

DATA = dict(clients=1, dataset="breast_cancer", epochs=1, ops=True)  # 15 steps a run


def _folders(files: dict[str, Path]) -> list[str]:
    runs = files["server"].parent / "state" / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir())


async def test_a_wall_clock_set_forward_removes_no_run_early(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the server judged an ended run's age by the wall clock alone, and a clock
    set forward two days removed a run that had ended seconds before (kept for an hour)."""
    # Prepare: ended runs kept an hour; the server looks at every tick
    files = deployment(**DATA)
    monkeypatch.setattr(retiring, "RETIRE_EVERY_S", 0.0)
    caplog.set_level(logging.WARNING, logger="sl_pipeline.server")
    async with _serving(files, "server.keep_ended_for_s=3600") as server:
        first = await _client(files, "client-1")
        # Execute: the wall clock jumps two days forward; the server looks again, then a
        # second run ends (which applies the policy too)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 2 * DAY_S)
        mark = time.monotonic()
        await wait_until(lambda: server.folders.checked_at > mark, timeout_s=30)
        listed = sorted(server.book.runs)
        second = await _client(files, "client-1")
        kept = sorted(server.book.runs)
    # Assert: both runs kept, listed and on disk; the jump logged once
    assert (first["run"], second["run"]) == ("run-1", "run-2")
    assert listed == ["run-1"] and kept == ["run-1", "run-2"], (listed, kept)
    assert _folders(files) == ["run-1", "run-2"]
    assert caplog.text.count("the wall clock moved +172800 s against the monotonic") == 1
