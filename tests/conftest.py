"""Shared fixtures: local deployments on free loopback ports, worker processes that always stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sl_pipeline.config import ClientConfig, ServerConfig, load
from sl_pipeline.config import read_toml as load_toml
from workers.client.link import Upstream
from workers.tools.demo import stop_process
from workers.tools.localdeploy import init_deployment, to_toml
from workers.tools.ports import use_port_range

from .workerproc import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]

# Workers run one torch thread each (train.threads = 1); in-process runs must match them so
# results are comparable bit for bit, and two cores are not oversubscribed.
torch.set_num_threads(1)

# Each parallel test process (pytest-xdist) picks its loopback ports from a range of its
# own, below the kernel's ephemeral range: two processes cannot hand out one port to two
# workers, and no outgoing connection's source port takes one (workers/tools/ports.py).
PORTS_LOW, PORTS_HIGH = 15000, 32000


def _ports_of_this_process() -> tuple[int, int]:
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = (PORTS_HIGH - PORTS_LOW) // count
    return PORTS_LOW + index * width, PORTS_LOW + (index + 1) * width - 1


use_port_range(*_ports_of_this_process())


@pytest.fixture
def deployment(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A factory: deployment(clients=2, dataset="digits", ...) -> dict of config paths."""

    def make(**kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("epochs", 1)
        out = tmp_path / f"deploy-{len(list(tmp_path.iterdir()))}"
        files = {k: Path(v) for k, v in init_deployment(out, **kwargs)["files"].items()}
        for name, path in files.items():
            if kwargs.get("ops") and name.startswith("client") and path.suffix == ".toml":
                cfg = load_toml(path)  # no Prometheus here: a finished client exits at once
                cfg["ops"]["linger_s"] = 0
                path.write_text(to_toml(cfg))
        return files

    return make


def load_server(path: Path, *overrides: str) -> ServerConfig:
    return load(ServerConfig, path, list(overrides))


def load_client(path: Path, *overrides: str) -> ClientConfig:
    return load(ClientConfig, path, list(overrides))


def wait_listening(
    config: Path, *watched: subprocess.Popen[str] | WorkerProcess, timeout_s: float = 60.0
) -> None:
    """Poll (bounded) until the worker of ``config`` accepts TCP connections on its bind port.
    A ``watched`` process (the worker itself) that exits fails the wait at once, with its
    log: a worker that cannot start says why, and the test does not wait out the timeout."""
    data = load_toml(config)
    section = data.get("server") or data.get("relay") or {}
    host, port = section["bind"].removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fail_if_exited(watched)
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.05)
    logs = "".join(_log_tail(proc) for proc in watched)
    raise AssertionError(f"nothing listens on {section['bind']} after {timeout_s}s{logs}")


def fail_if_exited(watched: tuple[subprocess.Popen[str] | WorkerProcess, ...]) -> None:
    for proc in watched:
        if proc.poll() is not None:
            _, err = proc.communicate()
            text = err or _log_tail(proc)  # a Popen whose stderr went to a file: None
            raise AssertionError(f"{proc.args} exited ({proc.returncode}): {text[-2000:]}")


def _log_tail(proc: subprocess.Popen[str] | WorkerProcess) -> str:
    """The end of a running worker's log (a forked one writes it to a file)."""
    log = getattr(proc, "log", None)
    text = log.read_text(errors="replace")[-2000:] if isinstance(log, Path) else ""
    return f"\n{proc.args} log:\n{text}"


def wait_for_files(
    folder: Path,
    pattern: str,
    count: int,
    *watched: subprocess.Popen[str] | WorkerProcess,
    timeout_s: float = 240.0,
) -> None:
    """Poll until ``folder`` holds ``count`` files matching ``pattern``. The event comes from
    ``watched`` processes (starting one costs an import of torch and a data load, minutes on
    a loaded host): one that exited fails the wait at once with its log, and ``timeout_s``
    only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob(pattern))) < count:
        fail_if_exited(watched)
        if time.monotonic() > deadline:
            raise AssertionError(f"{folder} did not get {count} {pattern} within {timeout_s}s")
        time.sleep(0.05)


class Procs:
    """Starts worker processes and guarantees they are stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, folder: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.folder = folder  # the stdout and stderr files of forked workers

    def start(self, role: str, config: Path, *extra: str) -> subprocess.Popen[str]:
        """``python -m workers ROLE ...``, as an operator starts a worker."""
        cmd = [sys.executable, "-m", "workers", role, "--config", str(config), *extra]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.procs.append(proc)
        return proc

    def fork(self, verb: str, config: Path, *extra: str) -> WorkerProcess:
        """``sl-pipeline VERB --config CONFIG ...`` (a worker, or ``predict``) in a process
        forked from one that imported torch once (seconds of CPU less each): for tests of what
        the command does, not of how ``python -m workers`` starts and ends. Offers what these
        tests use of a ``Popen`` (``communicate`` included)."""
        stem = self.folder / f"{verb}-{len(self.procs)}"
        argv = [verb, "--config", str(config), *extra]
        proc = WorkerProcess(argv, stem.with_suffix(".out"), stem.with_suffix(".log"))
        self.procs.append(proc)  # type: ignore[arg-type]  # stopped like a Popen
        return proc

    def stop_all(self) -> None:
        # Newest first: a client stops between two steps at once while its server still answers,
        # but waits out a retry when the server went first.
        for proc in reversed(self.procs):
            stop_process(proc, timeout_s=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    manager = Procs(tmp_path_factory.mktemp("procs"))
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def joins(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When a client of this process joined its next hop (each time). A bound on how long a
    client takes to give up counts from its first join, not from its start: its data load
    and model took 9 s at load 8, more than the waits under test."""
    times: list[float] = []
    set_connected = Upstream.set_connected

    def noting(self: Upstream, connected: bool) -> None:
        if connected:
            times.append(time.monotonic())
        set_connected(self, connected)

    monkeypatch.setattr(Upstream, "set_connected", noting)
    return times


# Modules holding tests of 8 s or more (CI, quiet 2-core host), longest first. `make test`'s
# pytest-xdist hands out one test at a time in collection order: a long test collected late
# could start when the other worker has little left, which then idles (up to the 45 s of the
# README's audit block). Collected first, they run while the short tests fill in around them.
LONG_FIRST = (
    "test_readme.py",
    "test_hostile_fuzz.py",
    "test_tune_resume.py",
    "test_hostile_chunks.py",
    "test_ops_journey_units.py",
    "test_privacy_reproducible.py",
    "test_e2e.py",
    "test_group_recovery.py",
    "test_privacy_label_attacks.py",
    "test_predict_and_demo.py",
    "test_lifecycle.py",
    "test_ushaped_leave.py",
    "test_bench_smoke.py",
    "test_soak.py",
)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs two workers) every Prometheus test runs on one worker:
    the package is installed once and each module fixture starts one instance (xdist hands the
    group out first: it has the most tests). The modules of :data:`LONG_FIRST` come next, whole
    and in their own order (a module's fixtures are not set up twice)."""
    for item in items:
        if item.get_closest_marker("prometheus") is not None:
            item.add_marker(pytest.mark.xdist_group("prometheus"))
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
