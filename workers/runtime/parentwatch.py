"""Workers a launcher starts stop when the launcher dies, however it dies.

``sl-pipeline demo`` starts a server, maybe a relay, and clients as processes, and stops them
in a ``finally``. A demo killed by SIGKILL (a CI job's timeout, an OOM kill, ``kill -9``)
runs no ``finally``: before, its server stayed listening on its port with no one to stop it.
A launcher names itself in :data:`PARENT_ENV` (its process id and start time, so a stale copy
of the variable names no other process); the worker asks Linux for SIGTERM when that parent
goes (``PR_SET_PDEATHSIG``), which it takes as any stop: drain, save, exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PARENT_ENV = "SL_PIPELINE_STOP_WITH_PARENT"  # "PID:START", the launcher's
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def started(pid: int) -> str:
    """Process ``pid``'s start time (clock ticks since boot), or "" when it is gone: with
    the id, it names one process, never a later one given the same id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def child_environment() -> dict[str, str]:
    """The environment for a worker that must stop when this process dies."""
    me = os.getpid()
    return {**os.environ, PARENT_ENV: f"{me}:{started(me)}"}


def stop_with_parent() -> bool:
    """Arm the parent-death signal where :data:`PARENT_ENV` asks for it (Linux only).
    Returns whether this worker is tied to its launcher. A launcher that died before this
    ran (the worker's own start takes seconds of imports) is noticed: the worker stops at
    once, and says why. A variable naming a live process that is not this worker's parent
    (copied into a service's environment) is ignored, with a warning."""
    wanted = os.environ.pop(PARENT_ENV, "")  # not inherited by what this worker starts
    if not wanted or not sys.platform.startswith("linux"):
        return False
    pid_text, _, start = wanted.partition(":")
    if not pid_text.isdigit() or not start:
        _say(f"ignoring {PARENT_ENV}={wanted!r}: not a launcher's PID:START")
        return False
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    launcher, alive = int(pid_text), started(int(pid_text)) == start
    if alive and os.getppid() == launcher:  # armed before this check: no death is missed
        return True
    if alive:
        prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
        _say(f"ignoring {PARENT_ENV}: process {launcher} is not this worker's parent")
        return False
    _say(f"the launcher that started this worker (process {launcher}) is gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    return True


def _say(line: str) -> None:
    print(f"sl-pipeline: {line}", file=sys.stderr, flush=True)


__all__ = ["PARENT_ENV", "child_environment", "started", "stop_with_parent"]
