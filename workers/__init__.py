"""workers: sl-pipeline's processes (server, client, relay) and its command line.

Started as the console script (``sl-pipeline ...``) or as ``python -m workers``, the process
takes Ctrl-C first of all: until ``workers.cli.main`` runs a command, a Ctrl-C (in an
import, in torch's, while the arguments are read) ends it at once with status 130 and one
line, never a traceback. Imported as a library (tests, in-process callers) it changes nothing.
"""

import contextlib as _contextlib
import os as _os
import signal as _signal
import sys as _sys


def interrupted_while_starting(signum: int, frame: object) -> None:
    """SIGINT before a command runs: one line on stderr, status 130, nothing done."""
    command = next((a for a in _sys.argv[1:2] if not a.startswith("-")), "")
    line = (
        f"sl-pipeline{' ' + command if command else ''}: error: interrupted (Ctrl-C) while "
        "starting; nothing was done, run the command again\n"
    )
    with _contextlib.suppress(OSError):  # no stderr to say it on: the status says it
        _os.write(2, line.encode(errors="replace"))
    _os._exit(130)


def _the_command_line() -> bool:
    """This process is the console script, or ``python -m workers`` (whose package is
    imported before its ``__main__``, with ``sys.argv[0]`` still "-m")."""
    if _os.path.basename(_sys.argv[0]).removesuffix(".exe") == "sl-pipeline":
        return True
    run = _sys.orig_argv[_sys.orig_argv.index("-m") + 1 :] if "-m" in _sys.orig_argv else []
    return _sys.argv[0] == "-m" and run[:1] == ["workers"]


if _the_command_line():
    _signal.signal(_signal.SIGINT, interrupted_while_starting)
