"""The workers' event loop (workers/runtime/eventloop.py): uvloop by default, asyncio's own on
request, and a bad choice refused in one line before anything starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sl_pipeline.errors import ConfigError
from tests.conftest import ROOT, wait_listening
from workers.runtime import eventloop


def test_the_choice_of_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def kind() -> str:
        return eventloop.running_loop()

    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.loop_name() == "uvloop"
    assert eventloop.run(kind()) == "uvloop"
    monkeypatch.setenv(eventloop.ENV, " AsyncIO ")
    assert eventloop.loop_factory() is None
    assert eventloop.run(kind()) == "asyncio"
    monkeypatch.setenv(eventloop.ENV, "tokio")
    with pytest.raises(ConfigError, match=r"SL_EVENT_LOOP='tokio'.*one of uvloop, asyncio"):
        eventloop.run(kind())


def _server(config: Path, choice: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop(eventloop.ENV, None)
    if choice is not None:
        env[eventloop.ENV] = choice
    cmd = [sys.executable, "-m", "workers", "server", "--config", str(config)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_a_server_runs_on_uvloop_and_says_so(
    deployment: Callable[..., dict[str, Path]],
) -> None:
    files = deployment(clients=1)
    server = _server(files["server"], None)
    try:
        wait_listening(files["server"], server)
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-2000:]
    listening = [line for line in err.splitlines() if "listening on" in line]
    assert listening and "(event loop: uvloop)" in listening[0], err[-2000:]


def test_an_unknown_loop_is_refused_in_one_line(
    deployment: Callable[..., dict[str, Path]],
) -> None:
    files = deployment(clients=1)
    server = _server(files["server"], "tokio")
    _, err = server.communicate(timeout=60)
    assert server.returncode not in (0, None)
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("sl-pipeline server: error: SL_EVENT_LOOP='tokio'"), last
    assert "uvloop, asyncio" in last and "unset it" in last, last


@pytest.mark.timeout(90)
def test_the_bench_section_pairs_the_two_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import event_loop

    monkeypatch.setattr(event_loop, "_plan", lambda quick, nbytes=0: (6, 4, 5.0))
    monkeypatch.setattr(event_loop, "SIZES", {"4KiB": 4096})
    monkeypatch.setenv(eventloop.ENV, "asyncio")  # the section sets each party's own

    result = event_loop.run(quick=True)

    assert result["event_loop_clients_ran_on"] == {"uvloop": "uvloop", "asyncio": "asyncio"}
    assert result["event_loop_ratio"]["4KiB"] > 0 and result["event_loop_cpu_ratio"]["4KiB"] > 0
    assert result["event_loop_ratio_spread"]["4KiB"]["pairs"] >= 4
    assert set(result["event_loop_rtt_ms"]["4KiB"]) == {"uvloop", "asyncio"}
    assert os.environ[eventloop.ENV] == "asyncio"  # given back
