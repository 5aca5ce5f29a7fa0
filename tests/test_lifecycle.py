"""Worker lifecycle as an operator sees it: SIGTERM, `health`, JSON logs, /status, /readyz.

Every test runs real worker processes on loopback (the ``procs`` fixture stops them all):
``python -m workers`` where how a process starts, logs or stops is under test, else forked
from the tests' forkserver (tests/workerproc.py: a torch import less each). Every wait is
bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Procs, fail_if_exited, wait_listening
from tests.scrape import metrics_token
from workers.ops.http import local_url

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LONG_EPOCHS = 500  # the tests stop the workers long before training ends
STOP_BOUND_S = 10.0
START_TIMEOUT_S = 60.0


def ops_url(config: Path) -> str:
    return local_url(tomllib.loads(config.read_text())["ops"]["listen"])


def http_get(url: str, token: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text); status 0 when nothing answers. ``token``: sent as
    ``Authorization: Bearer`` (a worker's /status shows its figures only for the
    metrics token its /metrics asks for)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=2.0) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, watched: Procs | None = None
) -> None:
    """Poll ``check`` until it holds; a process of ``watched`` that exits meanwhile fails
    the wait at once, with its log (a worker that could not start says why)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if watched is not None:
            fail_if_exited(tuple(watched.procs))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def training(url: str, token: str | None = None) -> bool:
    """True once the client at ``url`` has applied a step (its /status says so)."""
    status, body = http_get(f"{url}/status", token)
    return status == 200 and (body["epoch"] > 0 or body["step"] > 0)


def health(config: Path) -> int:
    cmd = [sys.executable, "-m", "workers", "health", "--config", str(config), "--timeout", "2"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=30, check=False).returncode


def output(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """stdout and stderr of a process that has exited."""
    out, err = proc.communicate(timeout=STOP_BOUND_S)
    return out, err


def test_sigterm_stops_the_server_and_the_client_fails_cleanly(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare: a client in mid-training, with a short rejoin budget
    files = deployment(clients=1, epochs=LONG_EPOCHS, ops=True)
    server = procs.start("server", files["server"])
    # the client's 2 s rejoin budget is for the stop, not a slow start
    wait_listening(files["server"], server)
    client = procs.fork(  # the server's stop is under test as it runs; the client's answer
        "client",
        files["client-1"],
        "--no-progress",
        "--set",
        "client.retry_for_s=2",
        "--set",
        "client.connect_timeout_s=1",
        # A request sent just as the server closes may go unanswered and unnoticed: bound
        # the wait for a reply so the client's whole give-up path fits the 30 s below.
        "--set",
        "client.timeout_s=5",
    )
    url, token = ops_url(files["client-1"]), metrics_token(files["client-1"].parent)
    wait_until(lambda: training(url, token), START_TIMEOUT_S, "training", procs)

    # Execute
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    server_rc = server.wait(timeout=STOP_BOUND_S)
    stopped_in = time.monotonic() - started
    client_rc = client.wait(timeout=30)

    # Assert
    _, server_err = output(server)
    _, client_err = output(client)
    assert server_rc == 0 and stopped_in < STOP_BOUND_S, server_err[-2000:]
    assert "server stopped after" in server_err
    assert client_rc not in (0, None)
    assert "Traceback" not in client_err, client_err[-3000:]
    last = client_err.strip().splitlines()[-1]
    assert last.startswith("sl-pipeline client: error:"), last
    assert "stopped answering" in last and "the same command" in last, last


def test_health_follows_the_server(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare
    files = deployment(clients=1, ops=True)
    server = procs.start("server", files["server"])

    # Execute / Assert: 0 once the server is ready, 1 after it stopped (readiness is polled
    # from here: a `health` process per poll took CPU from the server starting beside it)
    url = ops_url(files["server"])
    wait_until(lambda: http_get(f"{url}/readyz")[0] == 200, START_TIMEOUT_S, "/readyz", procs)
    assert health(files["server"]) == 0
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=STOP_BOUND_S) == 0
    assert health(files["server"]) == 1


@pytest.mark.parametrize(
    "progress",
    [
        pytest.param(["--no-progress"], id="no-progress"),
        pytest.param([], id="progress-default"),
    ],
)
def test_json_logs_are_json_on_every_stderr_line(
    deployment: Callable[..., dict[str, Path]], procs: Procs, progress: list[str]
) -> None:
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer", epochs=2, ops=True)
    server = procs.start("server", files["server"], "--log-format", "json")

    # Execute: a full (short) training, then a clean stop of the server
    client = procs.start("client", files["client-1"], "--log-format", "json", *progress)
    assert client.wait(timeout=120) == 0, output(client)[1][-2000:]
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=STOP_BOUND_S) == 0

    # Assert
    for name, proc in (("server", server), ("client", client)):
        lines = output(proc)[1].splitlines()
        assert lines, f"{name} logged nothing"
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                pytest.fail(f"{name} wrote a stderr line that is not JSON: {line[:200]!r}")
            assert isinstance(event, dict) and isinstance(event.get("msg"), str), line


def test_client_status_and_readiness_while_training(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare
    files = deployment(clients=1, epochs=LONG_EPOCHS, ops=True)
    url = ops_url(files["client-1"])
    procs.fork("server", files["server"])  # forked: what the ops port says, not how it starts
    procs.fork("client", files["client-1"], "--no-progress")

    token = metrics_token(files["client-1"].parent)  # what the deployment's Prometheus sends

    # Execute
    wait_until(lambda: training(url, token), START_TIMEOUT_S, "training", procs)
    ready_status, ready = http_get(f"{url}/readyz")
    _, first = http_get(f"{url}/status", token)
    wait_until(lambda: http_get(f"{url}/status", token)[1] != first, 10, "/status to move on")
    _, later = http_get(f"{url}/status", token)
    _, stranger = http_get(f"{url}/status")

    # Assert: the figures for the metrics token, the client's name for the status token only
    assert (ready_status, ready) == (200, {"ready": True})
    assert first["role"] == "client" and "name" not in first
    assert set(stranger) == {"role", "redacted"}
    for body in (first, later):
        assert isinstance(body["epoch"], int) and isinstance(body["step"], int)
        assert body["epoch"] >= 0 and body["step"] >= 0
    assert (later["epoch"], later["step"]) != (first["epoch"], first["step"])


def test_client_is_not_ready_before_it_has_joined(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare: a client whose server is not running yet
    files = deployment(clients=1, epochs=LONG_EPOCHS, ops=True)
    url = ops_url(files["client-1"])
    procs.fork("client", files["client-1"], "--no-progress")  # forked, as above
    wait_until(lambda: http_get(f"{url}/healthz")[0] == 200, START_TIMEOUT_S, "the ops port", procs)

    # Execute
    before = http_get(f"{url}/readyz")
    procs.fork("server", files["server"])
    token = metrics_token(files["client-1"].parent)
    wait_until(lambda: training(url, token), START_TIMEOUT_S, "training", procs)
    after = http_get(f"{url}/readyz")

    # Assert
    assert before[0] == 503 and before[1]["ready"] is False
    assert after == (200, {"ready": True})


def test_a_server_started_with_sigint_ignored_keeps_it_ignored(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare: the server as a shell without job control starts a background job
    # (`sl-pipeline server ... &` in a script): SIGINT ignored from the start
    files = deployment(clients=1, ops=True)
    cmd = [sys.executable, "-m", "workers", "server", "--config", str(files["server"])]
    server = subprocess.Popen(
        cmd,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    procs.procs.append(server)
    url = ops_url(files["server"])
    wait_until(
        lambda: http_get(f"{url}/readyz")[0] == 200, START_TIMEOUT_S, "the server ready", procs
    )
    # Execute: the Ctrl-C meant for the script's foreground, then the operator's SIGTERM
    server.send_signal(signal.SIGINT)
    # Assert: it still answers (its loop ran after the signal: two requests later), and
    # stops on SIGTERM as usual (before: the SIGINT stopped it, status 0, "server stopped")
    assert http_get(f"{url}/readyz")[0] == 200 and http_get(f"{url}/readyz")[0] == 200
    assert server.poll() is None
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=STOP_BOUND_S) == 0
    _, err = output(server)
    assert "server stopped after" in err and "Traceback" not in err, err[-2000:]


def test_a_server_dying_of_a_fatal_signal_prints_its_stack(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare: the console script's server, listening
    files = deployment(clients=1)
    server = procs.start("server", files["server"])
    wait_listening(files["server"], server)
    # Execute: what a crash in a native library (libzmq, torch) delivers
    server.send_signal(signal.SIGSEGV)
    # Assert: it says so, with where each thread was (before: the status alone, no word)
    assert server.wait(timeout=STOP_BOUND_S) == -signal.SIGSEGV
    _, err = output(server)
    assert "Fatal Python error: Segmentation fault" in err and "File " in err, err[-2000:]
