"""The worker commands: ``server`` and ``relay`` (listen until stopped), ``client`` (trains,
then exits) and ``predict`` (a trained client's model on new rows)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from workers import SIGINT_IGNORED_AT_START
from workers.cli.errors import say_error
from workers.ops.logs import configure_logging
from workers.runtime import eventloop
from workers.runtime.parentwatch import stop_with_parent


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

    summary = eventloop.run(main())
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
            say_error(args, "interrupted (Ctrl-C) while starting; nothing was trained yet")
        os._exit(130)

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _report_crashes()
    stop_with_parent()  # after the handler above: a launcher gone already means exit 0
    if not SIGINT_IGNORED_AT_START:  # a shell's background job: it stays ignored
        signal.signal(signal.SIGINT, interrupted)


def _report_crashes() -> None:
    """A worker that dies of a fatal signal (a segfault or abort in a native library) prints
    each thread's Python stack first: without it, it ended without a word (a demo's server
    once ended so while being stopped, and nothing told which)."""
    import faulthandler

    with contextlib.suppress(AttributeError, OSError, ValueError):  # stderr not a file (tests)
        if not faulthandler.is_enabled():
            faulthandler.enable(file=sys.stderr)


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
    summary = eventloop.run(worker.run())
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "server": cmd_server,
    "client": cmd_client,
    "relay": cmd_relay,
    "predict": cmd_predict,
}

__all__ = ["COMMANDS"]
