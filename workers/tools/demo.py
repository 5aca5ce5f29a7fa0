"""`sl-pipeline demo`: one server and N clients as separate OS processes on loopback TCP."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any

from sl_pipeline.errors import ConfigError, SLError
from workers.runtime.parentwatch import child_environment
from workers.tools.localdeploy import DEVICE_NAME, deployment_options, init_deployment

CLIENT_TIMEOUT_S = 600
STOP_TIMEOUT_S = 15


# Each worker in a session of its own: a Ctrl-C at the demo's terminal reaches the demo alone,
# which stops its workers (SIGTERM: each drains and exits 0) and says so in one line, rather
# than every worker printing its own interruption, or a traceback from one still importing.
APART = True


def worker_command(role: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "workers", role, "--config", str(config), *extra]


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise SLError(f"a worker printed no JSON summary; its output ended with: {text[-500:]!r}")


def stop_process(proc: subprocess.Popen[str], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait a bounded time, then SIGKILL. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return int(proc.returncode)


@contextlib.contextmanager
def _ctrl_c_after_listing() -> Iterator[None]:
    """A Ctrl-C that comes while a worker starts takes effect once it is listed to be
    stopped: raised inside ``Popen`` (after the fork, before exec's report), it left that
    worker running with no one to stop it (a test's Ctrl-C, sent once the worker existed)."""
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread: no Ctrl-C comes here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # KeyboardInterrupt, now that it can be stopped


def _start(
    started: list[Popen[str]], role: str, config: str, *extra: str, out: int | None, err: int | None
) -> Popen[str]:
    with _ctrl_c_after_listing():
        proc = subprocess.Popen(
            worker_command(role, Path(config), *extra),
            text=True,
            stdout=out,
            stderr=err,
            start_new_session=APART,
            env=child_environment(),  # a demo killed by SIGKILL takes its workers with it
        )
        started.append(proc)
    return proc


def _stop_server(server: Popen[str], interrupted: bool) -> None:
    """Stop the server; if it ended some other way than a clean stop, say how and show the end
    of its log. Not after a Ctrl-C: the user stopped the demo, and its one line says so (a
    server that ended oddly while being stopped then printed its log above that line)."""
    status = stop_process(server)
    if status in (0, -signal.SIGTERM) or interrupted or server.stderr is None:
        return
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    print(f"the demo's server {how}; its log ended with:", file=sys.stderr)
    print(server.stderr.read()[-800:], file=sys.stderr)


def run_processes(
    files: dict[str, str], clients: int, show_progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each client's JSON summary, and the server's (printed when it stops)."""
    results: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[str]] = []  # the server first
    try:
        server = _start(procs, "server", files["server"], "--json", out=PIPE, err=PIPE)
        if "relay-1" in files:  # multi-hop: the relay joins the server before clients join it
            _start(procs, "relay", files["relay-1"], out=subprocess.DEVNULL, err=PIPE)
        relays = len(procs) - 1
        for i in range(clients):
            shown = show_progress and i == 0
            extra = ["--json"] + ([] if shown else ["--no-progress"])
            config = files[f"client-{i + 1}"]
            _start(procs, "client", config, *extra, out=PIPE, err=None if shown else PIPE)
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        for i, proc in enumerate(procs[1 + relays :]):
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise SLError(
                    f"client-{i + 1} failed (exit {proc.returncode}): {(err or '').strip()[-800:]}"
                )
            results.append(last_json_line(out))
    finally:
        for proc in procs[1:]:
            stop_process(proc)
        if procs:
            _stop_server(procs[0], interrupted=isinstance(sys.exc_info()[1], KeyboardInterrupt))
    assert server.stdout is not None
    return results, last_json_line(server.stdout.read())


def aggregate(
    results: list[dict[str, Any]], args: argparse.Namespace, wall: float, server: dict[str, Any]
) -> dict[str, Any]:
    # Parties without labels (vertical feature parties) report no score; where none has the
    # labels (vertical, labels on the server) the figure is the server's own.
    scored = [r for r in results if r["test_accuracy"] is not None]
    losses = [r["train_loss"] for r in results if r["train_loss"] is not None]  # labels held
    total_test = sum(r["test_samples"] for r in scored) or 1
    accuracy = sum(r["test_accuracy"] * r["test_samples"] for r in scored) / total_test
    accuracy = accuracy if scored else server.get("test_accuracy")
    return {
        "topology": args.topology,
        "dataset": args.dataset,
        "clients": len(results),
        "epochs": results[0]["epochs"],
        "steps": sum(r["steps"] for r in results),
        "test_accuracy": None if accuracy is None else round(float(accuracy), 4),
        # None where only the server knows the loss (vertical: feature parties are not told it)
        "train_loss": round(sum(losses) / len(losses), 4) if losses else None,
        "bytes_sent": sum(r["bytes_sent"] for r in results),
        "bytes_received": sum(r["bytes_received"] for r in results),
        "encrypted": not args.insecure,
        "wall_seconds": round(wall, 2),
        # steps in flight, the deepest client's (with auto: the depth it settled at)
        "pipeline_depth": max(r.get("pipeline_depth", 1) for r in results),
        # where each party trained: the server's device, then each client's
        "devices": sorted({server["device"], *(r["device"] for r in results)}),
    }


def _shown(value: float | None) -> str:
    return "n/a (the server's)" if value is None else f"{value:.4f}"


def check_device(name: str) -> None:
    """Refuse a GPU the demo cannot use before any worker starts (each would refuse it
    itself, one by one, while the others wait for it)."""
    if name == "cpu" or not DEVICE_NAME.fullmatch(name):
        return  # a name that is no device: init_deployment says so
    import torch  # only for a GPU demo

    from sl_pipeline.models import resolve_device

    try:
        resolve_device(name)
    except ConfigError as exc:
        if torch.cuda.is_available():  # a GPU number beyond this machine's
            raise ConfigError(f"--device {name}: {exc.message}") from None
        raise ConfigError(
            f"--device {name}: no CUDA GPU is visible here; use --device cpu"
        ) from None


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sl-demo-") as tmp:
        folder = args.dir or Path(tmp)
        options = deployment_options(args)
        check_device(options["device"])
        clients = options["clients"]
        deployment = init_deployment(folder, **options)
        if not args.json:
            print(
                f"demo: 1 server + {clients} client process(es), topology {args.topology}, "
                f"dataset {args.dataset}, {'plaintext' if args.insecure else 'encrypted'}, "
                f"on {options['device']}"
            )
        results, server = run_processes(
            deployment["files"], clients, show_progress=sys.stderr.isatty()
        )
    summary = aggregate(results, args, time.perf_counter() - start, server)
    if getattr(args, "baseline", False):
        from workers.tools.baseline import central_accuracy

        summary["baseline_accuracy"] = round(
            central_accuracy(args.dataset, args.topology, summary["epochs"], args.seed, clients),
            4,
        )
    if not args.json:
        for r in results:
            acc = r["test_accuracy"]
            shown = "n/a (no labels)" if acc is None else f"{acc:.4f}"
            print(f"  {r['client']}: {r['steps']} steps, test accuracy {shown}")
        if "baseline_accuracy" in summary:
            baseline = summary["baseline_accuracy"]
            print(f"central baseline (same architecture, pooled data): {baseline:.4f}")
        print(
            f"test accuracy {_shown(summary['test_accuracy'])}, "
            f"train loss {_shown(summary['train_loss'])}, "
            f"{summary['bytes_sent'] / 1e6:.1f} MB sent, {summary['wall_seconds']:.1f}s"
        )
    return summary
