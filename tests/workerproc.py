"""Worker processes for fault tests, forked from a server that imported torch once.

Starting ``python -m workers`` costs seconds of CPU (the torch import); a chaos run starts
a dozen workers. Each :class:`WorkerProcess` is instead forked by a ``forkserver`` that has
imported the workers already, runs ``workers.cli.main(argv)`` with its stdout and stderr in
files, and can be killed (``SIGKILL``) like any process. It offers the part of
``subprocess.Popen`` that :func:`workers.tools.demo.stop_process` uses.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(
    [
        "torch",
        "sklearn.datasets",
        "workers.cli",
        "workers.server.worker",
        "workers.client.worker",
        "workers.relay",
    ]
)


def _run(argv: list[str], stdout: str, stderr: str) -> None:
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    from workers.cli import main

    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


class WorkerProcess:
    stdout = None  # what stop_process closes on a Popen
    stderr = None

    def __init__(self, argv: list[str], out: Path, log: Path) -> None:
        self.out, self.log = out, log
        self._proc = _CTX.Process(target=_run, args=(argv, str(out), str(log)))
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

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()
