"""`sl-pipeline runs` against a real server process that serves run after run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sl_pipeline.config import ClientConfig, ServerConfig, load
from sl_pipeline.errors import PeerError
from sl_pipeline.models import build_segments
from workers.cli import main
from workers.client.worker import ClientWorker
from workers.tools.demo import stop_process

from .threadserver import ThreadServer
from .workerproc import WorkerProcess


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _wait_ready(capsys: pytest.CaptureFixture[str], server: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _cli(capsys, "health", "--config", str(server), "--timeout", "1")[0] == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


class Workers:
    """`sl-pipeline` worker processes, forked from a process that imported torch once
    (tests/workerproc.py): each runs workers.cli.main(argv) with its output in files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[WorkerProcess] = []

    def start(self, name: str, *argv: str) -> WorkerProcess:
        index = len(self.procs)
        out, log = self.folder / f"{name}-{index}.out", self.folder / f"{name}-{index}.log"
        self.procs.append(WorkerProcess(list(argv), out, log))
        return self.procs[-1]

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout_s=10)  # type: ignore[arg-type]


def _finish(proc: WorkerProcess, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    assert proc.wait(timeout) == 0, proc.log.read_text()[-3000:]
    return json.loads(proc.out.read_text().strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_server_process_three_runs_listed_and_downloaded(
    deployment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=2, epochs=1, ops=True)
    server = str(files["server"])
    workers = Workers(tmp_path)
    try:
        workers.start("server", "server", "--config", server)
        _wait_ready(capsys, files["server"])
        for _ in range(3):  # the same two clients, three runs, one server process
            pair = [
                workers.start(n, "client", "--config", str(files[n]), "--json", "--no-progress")
                for n in ("client-1", "client-2")
            ]
            assert len({_finish(p)["run"] for p in pair}) == 1
        _check_runs(capsys, files["server"], tmp_path)
    finally:
        workers.stop_all()


def _check_runs(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    server = str(config)
    code, out, _ = _cli(capsys, "runs", "list", "--config", server, "--json")
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [(r["id"], r["state"]) for r in runs] == [(f"run-{i}", "finished") for i in (1, 2, 3)]
    assert all(r["clients"] == ["client-1", "client-2"] and r["steps"] > 0 for r in runs)
    assert all(0 <= r["test_accuracy"] <= 1 for r in runs)  # what its clients reported
    code, table, _ = _cli(capsys, "runs", "list", "--config", server)
    assert code == 0 and "run-3  finished" in table
    assert "ACCURACY" in table.splitlines()[0]
    assert f"{runs[2]['test_accuracy']:.4f}" in table.splitlines()[3]
    model = build_segments(load(ServerConfig, config).model, "vanilla")[-1]
    for run in runs:
        target = tmp_path / f"{run['id']}.pt"
        code, out, _ = _cli(
            capsys, "runs", "download", run["id"], "--config", server, "--out", str(target)
        )
        assert code == 0 and str(target) in out
        model.load_state_dict(torch.load(target, weights_only=True))  # a whole server segment
    code, out, _ = _cli(capsys, "runs", "status", "run-2", "--config", server, "--json")
    assert code == 0 and json.loads(out)["id"] == "run-2"


def _client_in_thread(config: Path, *sets: str) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []
    worker = ClientWorker(load(ClientConfig, config, list(sets)), config.parent, progress=False)

    def run() -> None:
        try:
            asyncio.run(worker.run())
        except BaseException as exc:  # the test asserts on it
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_an_operator_stops_a_training_run(
    deployment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=1, ops=True)
    server = str(files["server"])
    with ThreadServer(files["server"]) as worker:
        thread, errors = _client_in_thread(
            files["client-1"], 'client.run="long"', "train.epochs=500"
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            "long" in worker.book.runs and worker.book.runs["long"].steps
        ):
            time.sleep(0.05)
        code, out, _ = _cli(capsys, "runs", "stop", "long", "--config", server, "--json")
        assert code == 0 and json.loads(out)["state"] == "stopped"
        thread.join(60)
        assert len(errors) == 1 and isinstance(errors[0], PeerError), errors
        assert "run 'long' has stopped" in str(errors[0])
        code, out, _ = _cli(
            capsys, "runs", "download", "long", "--config", server, "--out", str(tmp_path / "l.pt")
        )
        assert code == 0
        assert set(torch.load(tmp_path / "l.pt", weights_only=True)) == set(
            worker.engine.model.state_dict()
        )


def test_runs_refuses_a_wrong_token_and_names_a_missing_server(
    deployment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=1, ops=True)
    cfg = tomllib.loads(files["server"].read_text())
    admin = tmp_path / "admin.toml"
    (tmp_path / "wrong.token").write_text("x" * 32)
    admin.write_text(f'[ops]\nlisten = "{cfg["ops"]["listen"]}"\nadmin_token = "wrong.token"\n')
    code, _, err = _cli(capsys, "runs", "list", "--config", str(admin))
    # nothing listens there: exit 2 (an address or a start order to fix, as for a worker that
    # finds no server at start), one line naming the address, the config and what to do
    assert code == 2 and "no server answers at http://127.0.0.1:" in err
    assert f"start the server, or set [ops] listen in {admin}" in err and err.count("\n") == 1
    with ThreadServer(files["server"]):
        code, _, err = _cli(capsys, "runs", "list", "--config", str(admin))
        assert code == 2 and "refused the admin token" in err
        code, _, err = _cli(capsys, "runs", "status", "nope", "--config", str(files["server"]))
        assert code == 2 and "no run 'nope'" in err


@contextlib.contextmanager
def answering(reply: bytes) -> Iterator[str]:
    """A loopback port that answers every connection with ``reply`` (not an ops port)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():  # bounded by the test: it sets ``done``
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(5)
                    conn.recv(4096)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(
    "reply",
    [b"\xff\x00garbage\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n<html>a web page</html>"],
    ids=["not_http", "not_json"],
)
def test_ops_verbs_at_a_port_of_another_program_say_so_in_one_line(
    reply: bytes, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Prepare: [ops] listen names a port where something else answers (a traceback before)
    (tmp_path / "admin.token").write_text("x" * 32)
    with answering(reply) as listen:
        config = tmp_path / "admin.toml"
        config.write_text(f'[ops]\nlisten = "{listen}"\nadmin_token = "admin.token"\n')
        # Execute
        runs = _cli(capsys, "runs", "list", "--config", str(config))
        health = _cli(capsys, "health", "--config", str(config), "--timeout", "5")
    # Assert: runs, a config problem (exit 2); health, not ready (exit 1, a probe's answer;
    # a web page answering 200 is no worker's readiness either: README); each one line
    # naming the address and what to do
    assert runs[0] == 2 and runs[2].count("\n") == 1
    assert f"something answers at http://{listen}" in runs[2]
    assert f"set [ops] listen in {config} to the server's ops address" in runs[2]
    assert health[0] == 1 and health[2].count("\n") == 1
    assert f"something answers at http://{listen}" in health[2]


def test_the_runs_verb_starts_without_torch(tmp_path: Path) -> None:
    """An operator's `runs` call imported torch through the API's server side (2-3 s of CPU
    a call); its client side lives apart."""
    (tmp_path / "admin.token").write_text("x" * 32)
    admin = tmp_path / "admin.toml"
    admin.write_text('[ops]\nlisten = "127.0.0.1:9"\nadmin_token = "admin.token"\n')
    probe = (
        "import sys\nfrom workers.cli import main\n"
        f"code = main(['runs', 'list', '--config', {str(admin)!r}])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
