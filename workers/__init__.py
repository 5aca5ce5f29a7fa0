"""workers: sl-pipeline's processes (server, client, relay) and its command line.

Started as the console script (``sl-pipeline ...``) or as ``python -m workers``, the process
takes Ctrl-C first of all: until ``workers.cli.main`` runs a command, a Ctrl-C (in an
import, in torch's, while the arguments are read) ends it at once with status 130 and one
line, never a traceback. Imported as a library (tests, in-process callers) it changes nothing.

The handler is in place before this package imports anything the interpreter has not loaded
already: ``_signal`` (the C module under ``signal``, which imports ``enum``) and ``os`` and
``sys``. ``contextlib`` and ``signal`` took 25 ms and 11 ms on a loaded host, in which a
Ctrl-C was a traceback. Before this package, the interpreter's own start and ``site`` are no
code of ours: a Ctrl-C there ends the process as SIGINT's default does (status 130 in the
shell, no line), or, in ``site``, with the interpreter's own traceback.
"""

import _signal
import os as _os
import sys as _sys


def interrupted_while_starting(signum: int, frame: object) -> None:
    """SIGINT before a command runs: one line on stderr, status 130, nothing done."""
    command = next((a for a in _sys.argv[1:2] if not a.startswith("-")), "")
    line = (
        f"sl-pipeline{' ' + command if command else ''}: error: interrupted (Ctrl-C) while "
        "starting; nothing was done, run the command again\n"
    )
    try:  # noqa: SIM105 (no contextlib: this runs before any import but the handler's)
        _os.write(2, line.encode(errors="replace"))
    except OSError:  # no stderr to say it on: the status says it
        pass
    _os._exit(130)


def _the_command_line() -> bool:
    """This process is the console script, or ``python -m workers`` (whose package is
    imported before its ``__main__``, with ``sys.argv[0]`` still "-m")."""
    if _os.path.basename(_sys.argv[0]).removesuffix(".exe") == "sl-pipeline":
        return True
    run = _sys.orig_argv[_sys.orig_argv.index("-m") + 1 :] if "-m" in _sys.orig_argv else []
    return _sys.argv[0] == "-m" and run[:1] == ["workers"]


# A shell without job control starts a background job (``sl-pipeline server ... &`` in a
# script) with SIGINT ignored, so that a Ctrl-C meant for the script's foreground leaves it
# running; a worker started so keeps it ignored throughout (SIGTERM still stops it).
SIGINT_IGNORED_AT_START = _signal.getsignal(_signal.SIGINT) == _signal.SIG_IGN

if _the_command_line() and not SIGINT_IGNORED_AT_START:
    _signal.signal(_signal.SIGINT, interrupted_while_starting)
