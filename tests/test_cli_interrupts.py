"""Ctrl-C, through the console script: the whole process group gets SIGINT, as from a
terminal. Each command ends with status 130 and one line saying it was interrupted; no
traceback, no line from each of its worker processes, no process left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

WAIT_S = 60


def _start(*argv: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers", *argv],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, which the "terminal" below interrupts
    )


def _until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)


def _interrupted(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C at the terminal; the one line the command printed."""
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], err
    return lines[0]


def test_ctrl_c_while_a_client_reads_its_data_is_one_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "rows.csv")  # a read that blocks until the test writes: start-up
    (tmp_path / "client.toml").write_text(
        '[client]\nserver = "tcp://127.0.0.1:1"\ninsecure = true\n'
        '[data]\npath = "rows.csv"\nlabel = "y"\n'
        '[model]\nbuiltin = "mlp"\nin_shape = [2]\nclasses = 2\n'
    )
    proc = _start("client", "--config", str(tmp_path / "client.toml"))
    writer: list[int] = []

    def reading() -> bool:  # a FIFO opens for writing only once a reader has it open
        try:
            writer.append(os.open(tmp_path / "rows.csv", os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            assert exc.errno == errno.ENXIO and proc.poll() is None, proc.communicate()
            return False
        return True

    try:
        _until(reading, "read its data")
        line = _interrupted(proc)  # was status 130 and not a word
    finally:
        for fd in writer:
            os.close(fd)
    assert line.startswith("sl-pipeline client: error: interrupted (Ctrl-C) while starting")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_ctrl_c_during_the_demo_is_one_line_and_stops_its_workers(tmp_path: Path) -> None:
    proc = _start("demo", "--dataset", "breast_cancer", "--epochs", "50", "--json")
    workers: list[int] = []

    def started() -> bool:
        assert proc.poll() is None, proc.communicate()
        workers[:] = _children(proc.pid)
        return len(workers) >= 2  # the server and its client

    try:
        _until(started, "started its workers")
        line = _interrupted(proc)  # was the workers' lines too (or a traceback)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    assert line.startswith("sl-pipeline demo: error: interrupted")
    for pid in workers:  # stopped by the demo, not left running
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


# Modules the command line imports before ``main`` runs, in order: the package itself (the
# first point a Ctrl-C can be taken by its code), the config, the last of the commands, and
# the command line whole (``main`` parsing the arguments, then the command).
IMPORTED = ("workers", "sl_pipeline.config", "workers.cli.privacy", "workers.cli")


@pytest.mark.parametrize("entry", ["console script", "python -m workers"])
@pytest.mark.parametrize("after", IMPORTED)
def test_ctrl_c_while_the_command_line_starts_is_one_line(
    tmp_path: Path, entry: str, after: str
) -> None:
    os.mkfifo(tmp_path / "project.toml")  # provision waits on it: the command never ends
    console = Path(sys.executable).with_name("sl-pipeline")
    argv = [str(console)] if entry == "console script" else [sys.executable, "-m", "workers"]
    proc = subprocess.Popen(
        [*argv, "provision", str(tmp_path / "project.toml"), "--out", str(tmp_path / "kits")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},  # a line as each module is in
    )
    never = threading.Timer(WAIT_S, proc.kill)  # the read below ends, whatever happens
    never.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # "import time: SELF | CUMULATIVE |   NAME"
            if line.rsplit("|", 1)[-1].strip() == after:
                break
        assert proc.poll() is None, f"ended before importing {after}"
        proc.send_signal(signal.SIGINT)  # was a traceback (status -2) while importing
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        never.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], err
    assert lines[0].startswith("sl-pipeline provision: error:"), lines
    assert not (tmp_path / "kits").exists()
