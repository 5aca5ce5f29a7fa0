"""`sl-pipeline`: the command line. Every failure is one clear line and an exit status.

The verbs live by concern: :mod:`workers.cli.roles` (the workers), :mod:`workers.cli.tools`
(init, provision, keygen, demo, bench), :mod:`workers.cli.ops` (health, runs) and
:mod:`workers.cli.privacy` (audit, tune); here, what every command shares: the dispatch,
its errors, its signals, and the console script's end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from sl_pipeline.errors import SLError
from workers import interrupted_while_starting
from workers.cli import ops as ops_cli
from workers.cli import privacy as privacy_cli
from workers.cli import roles as roles_cli
from workers.cli import tools as tools_cli
from workers.cli.errors import DISK_FULL, output_problem, path_problem, say_error
from workers.cli.parser import build_parser

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **roles_cli.COMMANDS,
    **tools_cli.COMMANDS,
    **ops_cli.COMMANDS,
    **privacy_cli.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _signals_given_back():
            return COMMANDS[args.command](args)
    except SLError as exc:
        say_error(args, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        say_error(args, "interrupted (Ctrl-C); run the command again to start over")
        return 130
    except OSError as exc:  # a path the command could not use: the operator's to fix
        if exc.filename is None and exc.errno not in DISK_FULL:
            raise
        say_error(args, path_problem(exc) if exc.filename else output_problem(exc))
        return 2


@contextlib.contextmanager
def _signals_given_back() -> Iterator[None]:
    """The SIGINT and SIGTERM handlers as they were before the command, after it. In the
    console script's process a Ctrl-C raises KeyboardInterrupt while the command runs (its
    own handling: rows kept, one line), not the start-up's exit at once."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if before[signal.SIGINT] is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in before.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread; not Python's
                signal.signal(sig, handler)


# Commands whose process ends without the interpreter's teardown (see ``console``).
WORKER_COMMANDS = ("server", "relay", "client")


def console() -> NoReturn:
    """The console script (and ``python -m workers``). A worker has saved its state and
    closed its sockets by the time ``main`` returns; what is left is the interpreter freeing
    torch and every module, about 1 s of CPU, ten times that on a loaded host. So a worker's
    process flushes its output and ends at once: SIGTERM stops it within its drain (the step
    in flight, 0.5 s for the notices), not after a teardown that no one needs."""
    import signal

    argv = sys.argv[1:]
    code = main(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a Ctrl-C now would only lose the status
    try:
        sys.stdout.flush()
    except OSError as exc:  # what is left of the output: its disk is full (said once)
        if code == 0:
            print(f"sl-pipeline {argv[0]}: error: {output_problem(exc)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code or 2)  # no second try at interpreter exit ("Exception ignored in")
    if argv and argv[0] in WORKER_COMMANDS:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
