"""Worker processes for fault tests, forked from a server that imported torch once.

Starting ``python -m workers`` costs seconds of CPU (the torch import); a chaos run starts
a dozen workers. Each :class:`WorkerProcess` is instead forked by a ``forkserver`` that has
imported the workers already, runs ``workers.cli.main(argv)`` with its stdout and stderr in
files, and can be killed (``SIGKILL``) like any process. It offers the part of
``subprocess.Popen`` that :func:`workers.tools.demo.stop_process` uses.

A fault test that must kill a server at an exact point (one that has applied steps its
checkpoints do not hold yet) gives it a :class:`StopBehind`: the forked server stops itself
(``SIGSTOP``) there, and the test kills it while it is stopped. Watching the checkpoint
files from outside cannot do that: the point lasts a few milliseconds and comes back only
every ``checkpoint.every_steps`` steps, so a poll can miss it until the run ends.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(
    [
        "torch",
        # what torch imports on a client's first backward with given gradients (sympy:
        # ~0.7 s of CPU in each forked client otherwise)
        "torch.fx.experimental.symbolic_shapes",
        "sklearn.datasets",
        "workers.cli",
        "workers.server.worker",
        "workers.client.worker",
        "workers.relay",
    ]
)


@dataclass(frozen=True)
class StopBehind:
    """Where a forked server (or relay) stops itself: after the replies to a message, once
    it has applied ``at`` steps or more and ``lead`` or more past its newest checkpoint
    (steps a ``kill -9`` now loses, and that its client has seen: their replies are out)."""

    at: int
    lead: int
    role: str = "server"  # or "relay"


def _stop_behind_checkpoint(point: StopBehind) -> None:
    """Install ``point`` in this forked process only (the forkserver and the test keep the
    worker as it is)."""
    from workers.relay import RelayWorker
    from workers.server.worker import ServerWorker

    worker = RelayWorker if point.role == "relay" else ServerWorker
    after_replies = worker.after_replies

    def stop_when_behind(self: ServerWorker | RelayWorker) -> None:
        after_replies(self)  # type: ignore[arg-type]
        assert self.ckpt is not None, "StopBehind needs a worker with checkpoint.dir"
        saved = max((int(p.stem.rsplit("-", 1)[-1]) for p in self.ckpt.list()), default=0)
        if self.steps_applied >= point.at and self.steps_applied - saved >= point.lead:
            os.kill(os.getpid(), signal.SIGSTOP)

    worker.after_replies = stop_when_behind  # type: ignore[method-assign,assignment]


def _redirect(stdout: str, stderr: str) -> None:
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)


def _run(argv: list[str], stdout: str, stderr: str, stop: StopBehind | None = None) -> None:
    _redirect(stdout, stderr)
    if stop is not None:
        _stop_behind_checkpoint(stop)
    from workers.cli import main

    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _console(argv: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """What the ``sl-pipeline`` console script runs, in ``cwd``, after its imports."""
    os.chdir(cwd)
    _redirect(stdout, stderr)
    sys.argv = ["sl-pipeline", *argv]
    from workers.cli import console

    console()


class WorkerProcess:
    stdout = None  # what stop_process closes on a Popen
    stderr = None

    def __init__(
        self, argv: list[str], out: Path, log: Path, stop: StopBehind | None = None
    ) -> None:
        self.args, self.out, self.log = argv, out, log
        self._start(_run, (argv, str(out), str(log), stop))

    def _start(self, target: Any, args: tuple[Any, ...]) -> None:
        self._proc = _CTX.Process(target=target, args=args)
        self._proc.start()
        assert self._proc.pid is not None
        self.pid: int = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) once it has exited, as ``Popen.communicate`` gives them."""
        self.wait(timeout)
        return self.out.read_text(errors="replace"), self.log.read_text(errors="replace")

    def stopped(self) -> bool:
        """Whether it is stopped (``SIGSTOP``: a :class:`StopBehind` point was reached)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:  # gone already
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")  # the name may hold ')'

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()


class ForkedPopen(WorkerProcess):
    """What ``subprocess.Popen([python, "-m", "workers", ...])`` gives
    :func:`workers.tools.demo.run_processes`, forked instead (see :func:`forked_subprocess`):
    its ``stdout``/``stderr`` are read once it has exited."""

    def __init__(self, cmd: list[str], folder: Path) -> None:
        assert cmd[1:3] == ["-m", "workers"], cmd
        stem = folder / f"{cmd[3]}-{len(list(folder.glob('*.out')))}"
        super().__init__(cmd[3:], stem.with_suffix(".out"), stem.with_suffix(".log"))

    @property  # type: ignore[override]
    def stdout(self) -> io.StringIO:
        return io.StringIO(self.out.read_text(errors="replace"))

    @property  # type: ignore[override]
    def stderr(self) -> io.StringIO:
        return io.StringIO(self.log.read_text(errors="replace"))


class ConsoleProcess(WorkerProcess):
    """``sl-pipeline ARGV`` typed in ``cwd``: the console script's own entry
    (``workers.cli.console``: its signal handling, flushes and exit status), run in a
    process forked after the imports that a fresh interpreter pays seconds of CPU for. Its
    stdin is /dev/null; its stdout and stderr go to ``out`` and ``log``."""

    def __init__(self, argv: list[str], cwd: Path, out: Path, log: Path) -> None:
        self.args, self.out, self.log = ["sl-pipeline", *argv], out, log
        self._start(_console, (argv, str(cwd), str(out), str(log)))


def forked_subprocess(folder: Path) -> types.SimpleNamespace:
    """A stand-in for the ``subprocess`` module of :mod:`workers.tools.demo` whose ``Popen``
    forks each worker from the forkserver (a torch import less each, seconds of CPU): for
    tests of what the demo does; tests/test_readme.py runs it as a user does."""
    return types.SimpleNamespace(
        Popen=lambda cmd, **_: ForkedPopen(cmd, folder),
        PIPE=subprocess.PIPE,
        DEVNULL=subprocess.DEVNULL,
        TimeoutExpired=subprocess.TimeoutExpired,
    )
