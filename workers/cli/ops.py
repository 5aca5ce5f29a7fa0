"""Commands that call a running worker's ops port: ``health`` (is it ready?) and ``runs``
(the server's training runs, through its admin API)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sl_pipeline.errors import ConfigError
from sl_pipeline.runid import is_run_id
from sl_pipeline.tenancy import SEPARATOR


def cmd_health(args: argparse.Namespace) -> int:
    from sl_pipeline.config import read_toml
    from workers.ops.http import local_url
    from workers.runtime.diagnose import health_report

    data = read_toml(args.config)
    listen = data.get("ops", {}).get("listen", "")
    if not listen:
        raise ConfigError(f"{args.config} has no [ops] listen address to check")
    # the address `runs` calls too: a wildcard (0.0.0.0, ::) is this machine's loopback
    ready, report = health_report(local_url(str(listen)), args.timeout)
    if not ready:
        print(f"sl-pipeline health: not ready: {report}", file=sys.stderr)
    return 0 if ready else 1


def cmd_runs(args: argparse.Namespace) -> int:
    from workers.ops.runsclient import RunClient, format_runs

    api = RunClient(args.config)
    if args.action == "list":
        if args.run:  # it listed every run, as if the id were not there
            raise ConfigError(f"runs list takes no run id; for one run: runs status {args.run}")
        body = api.runs()
        print(json.dumps(body) if args.json else format_runs(body["runs"]))
        return 0
    if not args.run:
        raise ConfigError(f"runs {args.action} needs a run id; `runs list` shows them")
    parts = args.run.split(SEPARATOR)  # RUN, or GROUP:RUN
    if len(parts) > 2 or not all(map(is_run_id, parts)):  # the server answered "404: Not Found"
        raise ConfigError(
            f"runs {args.action}: {args.run!r} is not a run id (RUN or GROUP:RUN, each letters, "
            "digits, '_', '.', '-'); `runs list` shows them"
        )
    if args.action == "download":
        out = args.out or Path(f"{args.run}-server.pt")
        if out.exists():  # another run's model, or anything else: the user's to keep
            raise ConfigError(f"--out {str(out)!r} exists; give a new file name (or move it)")
        _write_new(out, api.model(args.run))
        print(json.dumps({"run": args.run, "file": str(out)}) if args.json else f"wrote {out}")
        return 0
    method = "POST" if args.action == "stop" else "GET"
    suffix = "/stop" if args.action == "stop" else ""
    info = api.run(method, f"/runs/{args.run}{suffix}")
    print(json.dumps(info) if args.json else format_runs([info]))
    return 0


def _write_new(out: Path, data: bytes) -> None:
    """Write ``out`` whole or not at all: a temp file beside it, then linked in under its name
    (a full disk or a Ctrl-C leaves no half file; a file that appeared meanwhile is kept)."""
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        with tmp.open("xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, out)
    except FileExistsError:
        raise ConfigError(f"--out {str(out)!r} exists; give a new file name (or move it)") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot write --out {str(out)!r}: {exc.strerror or exc}; check that its folder "
            "exists, may be written and has space, or choose another"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "health": cmd_health,
    "runs": cmd_runs,
}

__all__ = ["COMMANDS"]
