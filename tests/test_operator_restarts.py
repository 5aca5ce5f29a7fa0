"""What an operator does next: the same command again after a Ctrl-C, a client behind a
relay, a client started while its server still waits. Each through the CLI, over real
loopback sockets, waiting for events (a step count, a log line), never a fixed time."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.cli import main
from workers.server.worker import ServerWorker
from workers.tools.demo import stop_process

from .conftest import wait_listening
from .threadserver import ThreadServer
from .workerproc import WorkerProcess


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.01)


def _client_steps(server: ServerWorker, run: str = "run-1") -> int:
    found = server.book.runs.get(run)
    return found.client_steps.get("client-1", 0) if found else 0


def _interrupted(config: Path, folder: Path, server: ServerWorker, *flags: str) -> str:
    """`sl-pipeline client` in a process of its own, stopped by Ctrl-C (SIGINT) once the
    server applied a few of its steps; returns its log."""
    out, log = folder / "first.out", folder / "first.log"
    first = WorkerProcess(["client", "--config", str(config), *flags], out, log)
    try:
        _until(lambda: _client_steps(server) >= 3 or first.poll() is not None, "3 steps")
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    assert out.read_text().startswith("stopped by signal after "), out.read_text()
    return log.read_text()


def test_the_same_command_after_ctrl_c_carries_on_without_a_checkpoint_dir(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`init` writes no [checkpoint] dir for a client. Ctrl-C used to leave nothing behind,
    and the same command again was refused as stale (`stale_step`, exit 4)."""
    # Prepare: a server, and a client of `init`'s config stopped by Ctrl-C a few steps in
    files = deployment(dataset="breast_cancer", epochs=8)
    assert "[checkpoint]" not in files["client-1"].read_text()
    config, state = files["client-1"], files["server"].parent / "state"
    with ThreadServer(files["server"]) as server:
        log = _interrupted(config, files["server"].parent, server)
        assert "state saved in" in log and "the same command resumes here" in log, log
        assert len(list(state.glob("client-1.stopped-*.ckpt"))) == 1
        # Execute: the same command again
        code = main(["client", "--config", str(config), "--json"])
        out, err = capsys.readouterr()
        summary = json.loads(out.strip().splitlines()[-1])
        # Assert: it carried on in its run; each step applied once; the stop state is gone
        _until(lambda: server.book.runs["run-1"].state == "finished", "the run's end")
        run = server.book.runs["run-1"]
    assert code == 0, err
    assert summary["run"] == "run-1" and 0 < summary["resumed_from"] < summary["steps"]
    assert run.steps == run.client_steps["client-1"] == summary["steps"] == 8 * 15
    assert list(state.glob("client-1.stopped-*")) == []


def test_a_stop_state_whose_run_was_stopped_meanwhile_is_one_line_then_a_fresh_start(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """The operator ended the run (`runs stop`) while the client was stopped: its state
    belongs to no open run. Training on from it in the next run would mix two runs."""
    # Prepare: a client stopped by Ctrl-C, then its run stopped on the server
    files = deployment(dataset="breast_cancer", epochs=8, ops=True)
    config, state = str(files["client-1"]), files["server"].parent / "state"
    with ThreadServer(files["server"]) as server:
        _interrupted(files["client-1"], files["server"].parent, server)
        assert main(["runs", "stop", "run-1", "--config", str(files["server"])]) == 0
        capsys.readouterr()
        # Execute: the same command, twice
        code = main(["client", "--config", config])
        err = capsys.readouterr().err
        again = main(["client", "--config", config, "--json"])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Assert: one line saying what happened and what to do; then a run from the start
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "this client stopped in run run-1, which the server no longer trains" in lines[0]
    assert "run the same command again to train from the start" in lines[0]
    assert again == 0 and summary["run"] == "run-2" and summary["resumed_from"] == 0
    assert summary["steps"] == 8 * 15 and list(state.glob("client-1.stopped-*")) == []


def test_a_client_behind_a_relay_reports_the_servers_run(
    deployment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """It said `in run -`: the relay's welcome names no run (the relay asks the server only
    at the client's first step). Two runs through one long-lived relay: each is named."""
    files = deployment(topology="multihop", dataset="breast_cancer")
    config = ["client", "--config", str(files["client-1"])]
    with ThreadServer(files["server"]) as server:
        logs = (tmp_path / "relay.out", tmp_path / "relay.log")
        relay = WorkerProcess(["relay", "--config", str(files["relay-1"])], *logs)
        try:
            wait_listening(files["relay-1"])
            reports = []
            for run in ("run-1", "run-2"):
                assert main(config) == 0
                out, err = capsys.readouterr()
                reports.append(out.strip())
                assert f"the relay trains this client in run {run}" in err, err
                _until(lambda r=run: server.book.runs[r].state == "finished", f"{run}'s end")  # type: ignore[misc]
        finally:
            assert stop_process(relay) == 0  # type: ignore[arg-type]
    for report, run in zip(reports, ("run-1", "run-2"), strict=True):
        assert report.startswith(f"trained 15 steps in run {run} in "), report
