"""Ctrl-C, through the console script: the whole process group gets SIGINT, as from a
terminal. Each command ends with status 130 and one line saying it was interrupted; no
traceback, no line from each of its worker processes, no process left behind."""

from __future__ import annotations

import errno
import itertools
import os
import signal
import subprocess
import sys
import sysconfig
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


def _interrupted_at(argv: list[str], folder: Path, at: Callable[[str], bool]) -> str:
    """Ctrl-C to ``argv provision`` (which never ends: it waits on a FIFO) at the first line of
    ``-X importtime`` for which ``at`` is true; its stderr, the import lines taken out, once
    it ended with 130 and no traceback."""
    os.mkfifo(folder / "project.toml")
    proc = subprocess.Popen(
        [*argv, "provision", str(folder / "project.toml"), "--out", str(folder / "kits")],
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
        next(line for line in proc.stderr if at(line))
        assert proc.poll() is None, "ended before the Ctrl-C"
        proc.send_signal(signal.SIGINT)  # was a traceback (status -2) while importing
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        never.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not (folder / "kits").exists()
    return "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))


def _imported(line: str) -> str:
    """The module of an "import time: SELF | CUMULATIVE |   NAME" line."""
    return line.rsplit("|", 1)[-1].strip()


STARTING = (
    "sl-pipeline provision: error: interrupted (Ctrl-C) while starting; nothing was done, "
    "run the command again"
)


@pytest.mark.parametrize("entry", ["console script", "python -m workers"])
@pytest.mark.parametrize("after", IMPORTED)
def test_ctrl_c_while_the_command_line_starts_is_one_line(
    tmp_path: Path, entry: str, after: str
) -> None:
    console = Path(sys.executable).with_name("sl-pipeline")
    argv = [str(console)] if entry == "console script" else [sys.executable, "-m", "workers"]
    err = _interrupted_at(argv, tmp_path, lambda line: _imported(line) == after)
    # after "workers.cli" the command may have begun: "interrupted (Ctrl-C); run ... again"
    assert len(err.splitlines()) == 1 and "interrupted (Ctrl-C)" in err, err
    assert err.startswith("sl-pipeline provision: error:"), err


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, frozenset[str]]:
    """The console script as a wheel installs it: an environment whose start-up loads nothing
    but the interpreter's own modules (this checkout's editable install loads pathlib, and
    with it most of what the package imports); and the modules that start-up loads."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (site_packages,) = venv.glob("lib/python*/site-packages")
    root = Path(__file__).resolve().parents[1]
    (site_packages / "paths.pth").write_text(f"{root}\n{sysconfig.get_paths()['purelib']}\n")
    script = Path(sys.executable).with_name("sl-pipeline").read_text().split("\n", 1)[1]
    console = venv / "bin" / "sl-pipeline"
    console.write_text(f"#!{python}\n{script}")
    console.chmod(0o755)
    bare = subprocess.run(  # a line as each module is in (or failed: sitecustomize)
        [str(python), "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    )
    return console, frozenset(_imported(line) for line in bare.stderr.splitlines())


@pytest.mark.parametrize("nth", [1, 2, 5])
def test_ctrl_c_at_the_first_imports_of_an_installed_console_is_one_line(
    tmp_path: Path, installed: tuple[Path, frozenset[str]], nth: int
) -> None:
    """Ctrl-C as the console script imports its n-th module beyond the interpreter's own: the
    first thing the package does is take Ctrl-C. Before, it imported contextlib and signal
    first (25 and 11 ms on a loaded host): a KeyboardInterrupt traceback, status -2. (A
    Ctrl-C at a fixed delay from the start lands mostly in the interpreter's own start-up,
    no code of ours, on this host up to 0.1 s and more: it tells nothing.)"""
    console, loaded = installed
    new = itertools.count(1)
    err = _interrupted_at(
        [str(console)], tmp_path, lambda line: _imported(line) not in loaded and next(new) == nth
    )
    assert err == STARTING
