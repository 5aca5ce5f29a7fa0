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

from sl_pipeline.errors import PeerError
from workers.cli import main
from workers.client.patience import Patience, max_tries
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


NO_DIR = ("--set", 'checkpoint.dir=""')  # a config without [checkpoint] dir (before init wrote one)


def test_the_same_command_after_ctrl_c_carries_on_without_a_checkpoint_dir(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """A client without [checkpoint] dir: Ctrl-C used to leave nothing behind, and the same
    command again was refused as stale (`stale_step`, exit 4)."""
    # Prepare: a server, and a client without a checkpoint dir stopped by Ctrl-C a few steps in
    files = deployment(dataset="breast_cancer", epochs=8)
    config, state = files["client-1"], files["server"].parent / "state"
    with ThreadServer(files["server"]) as server:
        log = _interrupted(config, files["server"].parent, server, *NO_DIR)
        assert "state saved in" in log and "the same command resumes here" in log, log
        assert len(list(state.glob("client-1.stopped-*.ckpt"))) == 1
        # Execute: the same command again
        code = main(["client", "--config", str(config), "--json", *NO_DIR])
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
    """The operator ended the run (`runs stop`) while the client was stopped: its stop state
    belongs to no open run. Training on from it in the next run would mix two runs. (With
    [checkpoint] dir: tests/test_run_lifecycle.py, the checkpoints stay.)"""
    flags = NO_DIR
    # Prepare: a client stopped by Ctrl-C, then its run stopped on the server
    files = deployment(dataset="breast_cancer", epochs=8, ops=True)
    config, state = str(files["client-1"]), files["server"].parent / "state"
    with ThreadServer(files["server"]) as server:
        _interrupted(files["client-1"], files["server"].parent, server, *flags)
        assert main(["runs", "stop", "run-1", "--config", str(files["server"])]) == 0
        capsys.readouterr()
        # Execute: the same command, twice
        code = main(["client", "--config", config, *flags])
        err = capsys.readouterr().err
        again = main(["client", "--config", config, "--json", *flags])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Assert: one line saying what happened and what to do; then a run from the start
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "this client stopped in run run-1, which the server no longer trains" in lines[0]
    assert "its stop state is removed" in lines[0]
    assert "run the same command again to train from the start" in lines[0]
    assert again == 0 and summary["run"] == "run-2" and summary["resumed_from"] == 0
    assert summary["steps"] == 8 * 15 and list(state.glob("client-1.stopped-*")) == []


def test_a_client_that_saves_nothing_keeps_no_stop_state_and_reads_none(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    """`audit --config` retrains a deployment's clients with client.save = "": they must
    neither resume from the deployment's stop state nor leave one there."""
    files = deployment(dataset="breast_cancer", epochs=8)
    theirs = files["server"].parent / "state" / "client-1.stopped-000000000005.ckpt"
    theirs.parent.mkdir()
    theirs.write_bytes(b"the operator's stop state")
    nothing = ("--set", 'client.save=""', *NO_DIR)  # as audit_deployment retrains them
    with ThreadServer(files["server"]) as server:
        log = _interrupted(files["client-1"], theirs.parent.parent, server, *nothing)
    assert "resumed" not in log and "nothing was saved, so a restart in run run-1" in log, log
    assert [p.name for p in theirs.parent.glob("client-1.stopped-*")] == [theirs.name]
    assert theirs.read_bytes() == b"the operator's stop state"


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
            wait_listening(files["relay-1"], relay)
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


@pytest.mark.timeout(120)
def test_a_refused_client_gives_up_within_its_window_with_one_line(
    deployment, capsys: pytest.CaptureFixture[str], joins: list[float]
) -> None:  # type: ignore[no-untyped-def]
    """After its part of run-1, a client starts run `other` while run-1 waits for client-2.
    Each refusal (`overloaded`) made it rejoin, refused then by its own old session
    (`name_in_use`), each rejoin with a fresh window: it asked again without end."""
    # Prepare: client-1 finished its part of run-1, which waits for client-2
    files = deployment(dataset="breast_cancer", clients=2)
    config = ["client", "--config", str(files["client-1"])]
    sets = ("server.empty_run_s=600", "server.takeover_after_s=1")
    with ThreadServer(files["server"], *sets) as server:
        assert main(config) == 0
        capsys.readouterr()
        # Execute: another run, with a window longer than server.takeover_after_s, so that
        # each rejoin used to get in at last, be refused again, and rejoin
        joins.clear()
        code = main([*config, "--run", "other", "--set", "client.retry_for_s=3"])
        took = time.monotonic() - joins[0]  # from its first join, not its start
        err = capsys.readouterr().err
        assert [r.state for r in server.book.runs.values()] == ["active"]
    # Assert: within the window and its count; one line naming what to do; exit 4
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert code == 4 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0] == err.strip().splitlines()[-1]
    assert errors[0].startswith("sl-pipeline client: error: peer error [overloaded]: client-1 ")
    assert "`sl-pipeline runs stop run-1`" in errors[0]
    assert "(client.retry_for_s = 3): start this client again" in errors[0]
    assert "name_in_use" not in err  # it left its old session before asking again
    assert took < 3 + 10 and 1 < err.count("refused the step") <= max_tries(3)


@pytest.mark.parametrize("window_s", [0.0, 3.0, 60.0, 1e9, float("inf")])
def test_the_wait_window_bounds_tries_and_time_and_an_answer_reopens_it(window_s: float) -> None:
    later = PeerError("overloaded", "full; retry later.")
    patience, now, tries = Patience(window_s), 0.0, 0
    with pytest.raises(PeerError) as spent:
        for _ in range(20_000):  # bounded: the window must end long before
            now += patience.refused(later, now, jitter=0.0)
            tries += 1
    assert tries < max_tries(window_s) <= 10_000 and now <= window_s
    assert str(spent.value).startswith("peer error [overloaded]: full; retry later; still ")
    patience.answered()  # a new window: the short first wait again
    assert patience.since is None and patience.tries == 0 and patience.delay == 0.2
