"""Workers a launcher starts stop when the launcher dies, however it dies.

``sl-pipeline demo`` starts a server, maybe a relay, and clients as processes, and stops them
in a ``finally``. A demo killed by SIGKILL (a CI job's timeout, an OOM kill, ``kill -9``)
runs no ``finally``: before, its server stayed listening on its port with no one to stop it.
A launcher names itself in :data:`PARENT_ENV`; the worker asks Linux for SIGTERM when that
parent goes (``PR_SET_PDEATHSIG``), which it takes as any stop: drain, save, exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "SL_PIPELINE_STOP_WITH_PARENT"  # the launcher's process id
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_environment() -> dict[str, str]:
    """The environment for a worker that must stop when this process dies."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def stop_with_parent() -> bool:
    """Arm the parent-death signal where :data:`PARENT_ENV` asks for it (Linux only).
    Returns whether it was armed. A launcher that died before this ran (the worker's own
    start takes seconds of imports) is noticed here: the worker is told to stop at once."""
    wanted = os.environ.pop(PARENT_ENV, "")  # not inherited by what this worker starts
    if not wanted.isdigit() or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != int(wanted):  # reparented: the launcher is gone already
        os.kill(os.getpid(), signal.SIGTERM)
    return True


__all__ = ["PARENT_ENV", "child_environment", "stop_with_parent"]
