"""How a command that failed says so: one line (a JSON record where the logs are JSON) naming
the problem and what to do."""

from __future__ import annotations

import argparse
import errno
import sys

from workers.ops.logs import configure_logging, json_error_line


def say_error(args: argparse.Namespace, problem: str) -> None:
    """The one line saying why the command failed: a JSON record where the logs are JSON
    (also when it failed before its logging was set up, e.g. on a bad config key)."""
    line = f"sl-pipeline {args.command}: error: {problem}"
    if json_error_line(line):
        return
    if getattr(args, "log_format", None) == "json":
        configure_logging("json", "INFO", args.command)
        if json_error_line(line):
            return
    print(line, file=sys.stderr)


# A full disk, a file-size limit, a quota: with no file named, the output (stdout) it is.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def output_problem(exc: OSError) -> str:
    return (
        f"cannot write the output ({exc.strerror or exc}); what was written is incomplete: "
        "free some space where it goes (or send it elsewhere) and run the command again"
    )


def path_problem(exc: OSError) -> str:
    where = f"{exc.filename!r}" + (f" -> {exc.filename2!r}" if exc.filename2 else "")
    return (
        f"cannot use {where}: {exc.strerror or exc}; check the path (does its folder exist, "
        "is a file in the way of a folder, may this user write there?)"
    )


__all__ = ["DISK_FULL", "output_problem", "path_problem", "say_error"]
