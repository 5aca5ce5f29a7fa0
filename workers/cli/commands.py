"""`sl-pipeline`: the command line. Every failure is one clear line and an exit status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from sl_pipeline.errors import ConfigError, SLError
from workers import interrupted_while_starting
from workers.cli import privacy as privacy_cli
from workers.cli.parser import build_parser
from workers.ops.logs import configure_logging, json_error_line

log = logging.getLogger("sl_pipeline")


def _overrides(args: argparse.Namespace, role: str) -> list[str]:
    sets = list(args.set)
    if args.insecure:
        sets.append(f"{role}.insecure=true")
    if getattr(args, "epochs", None) is not None:
        sets.append(f"train.epochs={args.epochs}")
    if getattr(args, "run", None):
        sets.append(f'client.run="{args.run}"')
    if getattr(args, "takeover", False):
        sets.append("client.takeover=true")
    return sets


def _setup_logging(args: argparse.Namespace, ops_format: str, level: str, role: str) -> None:
    configure_logging(args.log_format or ops_format, level, role)


def _set_threads(threads: int) -> None:
    """One torch thread per worker by default: client and server processes on the same
    small host otherwise fight over the cores (a 10x slowdown measured on 2 cores)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _serve(args: argparse.Namespace, role: str) -> int:
    """Run a listening worker (server or relay) until SIGTERM/SIGINT, then report."""
    _exit_quietly_on_sigterm(args)
    from workers.relay import RelayWorker
    from workers.runtime.startup import install_stop_signals
    from workers.server.worker import ServerWorker

    cls, config_cls = (
        (ServerWorker, ServerConfig) if role == "server" else (RelayWorker, RelayConfig)
    )
    cfg: Any = load(config_cls, args.config, _overrides(args, role))
    _setup_logging(args, cfg.ops.log_format, cfg.ops.log_level, role)
    _set_threads(cfg.train.threads)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        install_stop_signals(stop)
        return await cls(cfg, args.config.parent).serve(stop)

    summary = asyncio.run(main())
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    return _serve(args, "server")


def cmd_relay(args: argparse.Namespace) -> int:
    return _serve(args, "relay")


def cmd_predict(args: argparse.Namespace) -> int:
    from workers.client.predict import run_predict

    cfg = load(ClientConfig, args.config, _overrides(args, "client"))
    configure_logging("text", "WARNING", "client")
    result = run_predict(cfg, args.config.parent, args.input)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        shown = result.get("labels", result["predictions"])
        for i, value in enumerate(shown):
            print(f"{result['ids'][i]},{value}" if "ids" in result else value)
    return 0


def _exit_quietly_on_sigterm(args: argparse.Namespace) -> None:
    """Before the event loop runs (imports, data loading) a SIGTERM just ends the process
    with status 0: nothing has been trained or sent yet; a Ctrl-C ends it at once with 130
    and one line. (Raised as KeyboardInterrupt, it could land in an import that swallows it
    and leaves numpy half-imported: a RecursionError 20 s later, status 1.) The loop then
    installs its own; both are given back when the command returns (in-process callers)."""
    import signal

    def interrupted(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):  # a print it interrupted may hold stderr
            _error(args, "interrupted (Ctrl-C) while starting; nothing was trained yet")
        os._exit(130)

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    signal.signal(signal.SIGINT, interrupted)


def cmd_client(args: argparse.Namespace) -> int:
    _exit_quietly_on_sigterm(args)
    from workers.client.worker import ClientWorker

    cfg = load(ClientConfig, args.config, _overrides(args, "client"))
    _setup_logging(args, cfg.ops.log_format, cfg.ops.log_level, "client")
    _set_threads(cfg.train.threads)
    json_logs = (args.log_format or cfg.ops.log_format) == "json"  # keep stderr pure JSON
    # A bar only on a terminal: in a log file its carriage returns are noise (epoch lines remain).
    bar = sys.stderr.isatty() and not (args.no_progress or json_logs)
    worker = ClientWorker(cfg, args.config.parent, progress=bar)
    summary = asyncio.run(worker.run())
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(_client_report(summary))
    return 0


def _client_report(summary: dict[str, Any]) -> str:
    accuracy = summary["test_accuracy"]
    stopped = summary.get("stopped_early")
    if accuracy is not None:
        shown = f"{accuracy:.4f}"
    elif summary.get("best_epoch") or (summary["steps"] and not stopped):
        shown = "n/a (this party holds no labels)"
    else:
        shown = "n/a (not evaluated yet)"
    best = f" (best: epoch {summary['best_epoch']})" if summary.get("best_epoch") else ""
    model = summary.get("model") or (
        "none trained" if not summary["steps"] else "not saved (set client.save)"
    )
    verb = "stopped by signal after" if stopped else "trained"
    return (
        f"{verb} {summary['steps']} steps in run {summary.get('run') or '-'} in "
        f"{summary['wall_seconds']:.1f}s; test accuracy {shown}{best}; model: {model}"
    )


def cmd_init(args: argparse.Namespace) -> int:
    from workers.tools.localdeploy import deployment_options, init_deployment, start_commands

    result = init_deployment(args.dir, **deployment_options(args))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    print("start each worker in its own terminal, the server first:")
    for _, command in start_commands(result["files"]):
        print(f"  {command}")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from workers.tools.provision import provision, write_example

    if args.example:
        print(f"wrote {write_example(args.project)}: edit it, then provision --out DIR")
        return 0
    if args.out is None:
        raise ConfigError("provision needs --out DIR (a new folder for the kits)")
    result = provision(args.project, args.out)
    print(f"wrote one folder per site under {result['dir']}; copy each to its machine.")
    print("on each machine, start its site (the server first):")
    for site, script in result["sites"].items():
        print(f"  {site}: sh {script}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.tools.demo import run_demo

    configure_logging("text", "WARNING", "demo")
    summary = run_demo(args)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``python -m bench`` from the source tree this package was installed from."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__main__.py").exists():
        raise ConfigError(
            "the benchmark suite lives in the source tree (bench/); run it from a checkout"
        )
    chosen = (("--quick", args.quick), ("--json", args.json), ("--pin", args.pin))
    flags = [flag for flag, on in chosen if on]
    if args.only:
        flags += ["--only", *args.only]
    flags += ["--device", args.device]
    return subprocess.run([sys.executable, "-m", "bench", *flags], cwd=root, check=False).returncode


def cmd_keygen(args: argparse.Namespace) -> int:
    from sl_pipeline.keys import fingerprint, load_public_key, write_keypair

    private, public = write_keypair(args.name, args.out)
    print(f"private key: {private} (mode 0600; keep it secret)")
    print(f"public key:  {public} (fingerprint {fingerprint(load_public_key(public))})")
    return 0


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
        body = api.runs()
        print(json.dumps(body) if args.json else format_runs(body["runs"]))
        return 0
    if not args.run:
        raise ConfigError(f"runs {args.action} needs a run id; `runs list` shows them")
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
    "server": cmd_server,
    "client": cmd_client,
    "relay": cmd_relay,
    "predict": cmd_predict,
    "init": cmd_init,
    "provision": cmd_provision,
    "demo": cmd_demo,
    "keygen": cmd_keygen,
    "bench": cmd_bench,
    "health": cmd_health,
    **privacy_cli.COMMANDS,
    "runs": cmd_runs,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _signals_given_back():
            return COMMANDS[args.command](args)
    except SLError as exc:
        _error(args, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error(args, "interrupted (Ctrl-C); run the command again to start over")
        return 130
    except OSError as exc:  # a path the command could not use: the operator's to fix
        if exc.filename is None and exc.errno not in DISK_FULL:
            raise
        _error(args, _path_problem(exc) if exc.filename else _output_problem(exc))
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


def _error(args: argparse.Namespace, problem: str) -> None:
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


def _output_problem(exc: OSError) -> str:
    return (
        f"cannot write the output ({exc.strerror or exc}); what was written is incomplete: "
        "free some space where it goes (or send it elsewhere) and run the command again"
    )


def _path_problem(exc: OSError) -> str:
    where = f"{exc.filename!r}" + (f" -> {exc.filename2!r}" if exc.filename2 else "")
    return (
        f"cannot use {where}: {exc.strerror or exc}; check the path (does its folder exist, "
        "is a file in the way of a folder, may this user write there?)"
    )


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
            print(f"sl-pipeline {argv[0]}: error: {_output_problem(exc)}", file=sys.stderr)
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
