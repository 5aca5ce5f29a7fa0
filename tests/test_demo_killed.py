"""A demo killed by SIGKILL takes its workers with it (Linux's parent-death signal).

Before, ``sl-pipeline demo`` stopped its server and clients in a ``finally`` only; a SIGKILL
(a CI job's timeout, the OOM killer, ``kill -9``) ran none of it and left the server child
listening on its port, an orphan, found by the journey review.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.runtime.parentwatch import PARENT_ENV, child_environment, started, stop_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

WAIT_S = 120.0  # a worker's start (imports) and its drain, on a loaded 2-core machine
POLL_S = 0.1


def _alive(pid: int) -> bool:
    """Running: not gone and not a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry))
    return found


def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_S:.0f}s for {what}"
        time.sleep(POLL_S)


def test_a_demo_killed_by_sigkill_leaves_no_worker_running(tmp_path: Path) -> None:
    demo = subprocess.Popen(  # the console script's own entry, a demo far longer than the test
        [sys.executable, "-m", "workers", "demo", "--epochs", "500", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        _until(lambda: len(_children(demo.pid)) >= 2, "the demo's server and client")
        workers = _children(demo.pid)
        demo.send_signal(signal.SIGKILL)
        demo.wait(WAIT_S)
        _until(lambda: not any(_alive(pid) for pid in workers), "the workers to stop")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(WAIT_S)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _worker_with(value: str) -> subprocess.CompletedProcess[str]:
    """A process that arms the tie as a worker does, with ``value`` in the variable; its
    SIGTERM handler exits 7 (a worker's drains and exits 0), else it exits 0 itself (a
    signal a process sends itself is delivered before ``kill`` returns)."""
    code = (
        "import os, signal, sys\n"
        "from workers.runtime.parentwatch import PARENT_ENV, stop_with_parent\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        f"os.environ[PARENT_ENV] = {value!r}\n"
        "print(stop_with_parent(), PARENT_ENV in os.environ, flush=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], timeout=WAIT_S, capture_output=True, text=True, check=False
    )


def test_a_worker_whose_launcher_is_gone_already_stops_at_once() -> None:
    """The launcher died while the worker was still importing: nothing would signal it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    launcher = f"{gone.pid}:{started(gone.pid)}"  # named while it lives, as a launcher does
    gone.wait(WAIT_S)
    done = _worker_with(launcher)
    assert done.returncode == 7, done
    assert "is gone; stopping" in done.stderr


def test_a_stale_variable_naming_another_live_process_is_ignored_with_a_warning() -> None:
    """A service whose environment was copied from a demo's worker must not stop silently
    (it exited 0 with no word: red team); the init process is alive and no one's launcher."""
    done = _worker_with(f"1:{started(1)}")
    assert done.returncode == 0 and done.stdout.split() == ["False", "False"], done
    assert "is not this worker's parent" in done.stderr


def test_the_parent_is_named_only_to_the_launched_worker(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert child_environment()[PARENT_ENV] == f"{os.getpid()}:{started(os.getpid())}"
    monkeypatch.delenv(PARENT_ENV, raising=False)
    assert stop_with_parent() is False  # a worker a user started: no tie to its shell
    code = (  # armed in a process of its own: this one's parent is pytest's
        "import os\n"
        "from workers.runtime.parentwatch import PARENT_ENV, started, stop_with_parent\n"
        "os.environ[PARENT_ENV] = f'{os.getppid()}:{started(os.getppid())}'\n"
        "print(stop_with_parent(), PARENT_ENV in os.environ)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], timeout=WAIT_S, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "False"]  # armed, and not passed on


def test_a_ctrl_c_while_a_worker_starts_waits_until_it_is_listed() -> None:
    # raised inside Popen, after the fork, it left that worker with no one to stop it (the
    # Ctrl-C test of the demo failed once in CI: a worker still running after the demo)
    from workers.tools.demo import _ctrl_c_after_listing

    listed: list[str] = []
    with pytest.raises(KeyboardInterrupt), _ctrl_c_after_listing():
        os.kill(os.getpid(), signal.SIGINT)  # delivered before kill returns
        listed.append("worker")  # still runs: the interrupt waits for the block's end
    assert listed == ["worker"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
