"""The command line: clear one-line errors with exit status 2 for bad configuration."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.cli import main

from .conftest import Procs
from .threadserver import ThreadServer


def test_unknown_key_is_named_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochz = 3\n")
    assert main(["client", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.epochz" in err and "Traceback" not in err


def test_wrong_type_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('[server]\nmax_clients = "many"\n')
    assert main(["server", "--config", str(cfg)]) == 2
    assert "server.max_clients" in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_missing_key_file_is_named(deployment, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    files = deployment()
    (files["server"].parent / "keys" / "server.key").unlink()
    assert main(["server", "--config", str(files["server"])]) == 2
    assert "server.key" in capsys.readouterr().err


def test_bad_endpoint_is_named(deployment, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    files = deployment()
    assert (
        main(["client", "--config", str(files["client-1"]), "--set", 'client.server="localhost:1"'])
        == 2
    )
    assert "client.server" in capsys.readouterr().err


def test_unreachable_server_exits_2(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    # a process of its own (its exit status is under test), forked from one that imported
    # torch once: what the client does, not how `python -m workers` starts
    files = deployment()
    client = procs.fork(
        "client",
        files["client-1"],
        "--no-progress",
        "--set",
        "client.retry_for_s=1",
        "--set",
        "client.connect_timeout_s=0.5",
    )
    returncode = client.wait(timeout=60)
    _, stderr = client.communicate()
    assert returncode == 2, stderr
    assert "client.server" in stderr and "Traceback" not in stderr


def test_init_writes_configs_with_tcp_endpoint_and_keys(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "d"), "--clients", "3"]) == 0
    server = (tmp_path / "d" / "server.toml").read_text()
    assert 'bind = "tcp://127.0.0.1:' in server
    for i in (1, 2, 3):
        assert (tmp_path / "d" / f"client-{i}.toml").exists()
        assert (tmp_path / "d" / "keys" / "admitted" / f"client-{i}.pub").exists()
    assert (tmp_path / "d" / "keys" / "server.key").stat().st_mode & 0o077 == 0


def test_init_checkpoints_the_server_and_prints_every_start_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "d"), "--topology", "multihop", "--clients", "2"]) == 0
    out = capsys.readouterr().out
    for site in ("server", "relay-1", "client-1", "client-2"):
        config = tmp_path / "d" / f"{site}.toml"
        assert f"sl-pipeline {site.split('-')[0]} --config {config}" in out, out
    assert tomllib.loads((tmp_path / "d" / "server.toml").read_text())["checkpoint"]["dir"]


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "alice", "--out", str(tmp_path)]) == 0
    assert main(["keygen", "alice", "--out", str(tmp_path)]) == 2
    assert "alice.key" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_config_error(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    files = deployment()
    assert main(["server", "--config", str(files["server"]), "--set", 'train.device="cuda"']) == 2
    assert "train.device" in capsys.readouterr().err


def test_device_auto_trains_where_it_can(deployment) -> None:  # type: ignore[no-untyped-def]
    """train.device = "auto" (docs/config.md): the GPU when one is visible, else the CPU."""
    files = deployment(dataset="breast_cancer")
    auto = ("--set", 'train.device="auto"')
    with ThreadServer(files["server"], *auto[1:]):
        assert main(["client", "--config", str(files["client-1"]), "--json", *auto]) == 0


@pytest.mark.parametrize(
    ("role", "table", "named"),
    [
        ("server", "[privacy.noise]\nsigma = 1.0\nclip = 1.0\n", "privacy.noise"),
        ("server", "[privacy.nopeak]\nalpha = 1.0\n", "privacy.nopeak"),
        ("server", '[privacy.label]\nmechanism = "marvell"\nscale = 1.0\n', "privacy.label"),
        ("client-1", '[privacy.label]\nmechanism = "marvell"\nscale = 1.0\n', "privacy.label"),
        ("client-1", "[privacy.noise]\nsigmaa = 1.0\n", "privacy.noise.sigmaa"),
        ("client-1", "[privacy.nopeek]\n", "privacy.nopeek.alpha"),  # a required key missing
    ],
)
def test_privacy_tables_are_typed_and_placed_for_every_worker(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    role: str,
    table: str,
    named: str,
) -> None:
    # Prepare: a vanilla deployment whose worker file gets a [privacy] table it cannot apply
    files = deployment()
    with files[role].open("a") as fh:
        fh.write("\n" + table)
    verb = "server" if role == "server" else "client"
    # Execute
    status = main([verb, "--config", str(files[role])])
    # Assert: refused at load, one line naming the key, nothing silently ignored
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert named in err and "Traceback" not in err and "\n" not in err


def test_the_command_line_starts_without_importing_torch() -> None:
    """init, keygen, health and runs are run often (scripts, probes): no torch import for them."""

    code = "import sys, workers.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_pipeline_depth_auto_is_written_as_0_and_a_bad_depth_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    assert main(["init", str(tmp_path / "d"), "--pipeline-depth", "auto"]) == 0
    with pytest.raises(SystemExit) as refused:
        main(["init", str(tmp_path / "e"), "--pipeline-depth", "fast"])
    with pytest.raises(SystemExit) as too_deep:
        main(["init", str(tmp_path / "f"), "--pipeline-depth", "17"])

    # Assert
    assert "pipeline_depth = 0" in (tmp_path / "d" / "client-1.toml").read_text()
    assert refused.value.code == too_deep.value.code == 2
    err = capsys.readouterr().err
    assert "'fast' is not a number of steps or 'auto'" in err
    assert "17 must be between 1 and 16 (or 'auto')" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "d", "--dataset", "nope"],
        ["client"],
        ["demo", "--epochs", "many"],
        ["runs", "rename", "--config", "s.toml"],
        [],
    ],
    ids=["bad-choice", "missing-flag", "not-a-number", "unknown-verb", "no-command"],
)
def test_a_usage_error_is_one_line_naming_the_problem_and_the_help(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """README: every failure is one line on stderr naming the cause and what to do, exit 2;
    argparse printed its whole usage block (9 lines for init) above the error."""
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "--help" in lines[0], lines


def test_with_json_logs_the_final_error_is_a_json_line(deployment, capsys) -> None:  # type: ignore[no-untyped-def]
    """README: `--log-format json` gives one JSON object per log line, and a collector reading
    stderr must get the line that says why the worker ended as JSON too, not as plain text,
    and once (every failure is one line)."""
    # Prepare: a server whose private key is gone, found once logging is set up
    files = deployment()
    (files["server"].parent / "keys" / "server.key").unlink()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # Execute
    try:
        status = main(["server", "--config", str(files["server"]), "--log-format", "json"])
    finally:  # the JSON handler must not outlive this test in its process
        root.handlers[:] = handlers
        root.setLevel(level)
    # Assert
    assert status == 2
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    last = lines[-1]
    assert last["level"] == "ERROR" and "server.key" in last["msg"], last
    assert last["msg"].startswith("sl-pipeline server: error: ")
    # once: the line was written twice when --log-format json had set the JSON logs up
    assert [line["msg"] for line in lines].count(last["msg"]) == 1, lines


def test_with_json_logs_a_bad_config_key_is_a_json_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The same before the worker set its logging up: the config is refused first."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochz = 3\n")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        status = main(["client", "--config", str(cfg), "--log-format", "json"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "train.epochz" in json.loads(line)["msg"]


@contextlib.contextmanager
def _serving(server: http.server.ThreadingHTTPServer) -> Iterator[int]:
    """``server`` answering in a thread while the block runs; its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _NotAWorker(http.server.BaseHTTPRequestHandler):
    """Another service on the ops port (node_exporter's default is 9100 too): a page or a
    404 for every path, /readyz included."""

    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"<html>node exporter</html>")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status", [200, 404])
def test_health_is_not_fooled_by_another_http_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    """README: `health` exits 1 when something other than a worker answers at its ops address;
    a page answering 200 was taken as a ready worker (exit 0), a 404 as a worker not ready."""
    handler = type("Handler", (_NotAWorker,), {"status": status})
    with _serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as port:
        cfg = tmp_path / "server.toml"
        cfg.write_text(f'[ops]\nlisten = "127.0.0.1:{port}"\n')
        code = main(["health", "--config", str(cfg), "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 1
    assert "not as an sl-pipeline worker's ops port" in err and len(err.splitlines()) == 1, err


class _OtherJsonApi(_NotAWorker):
    """Another JSON API on the address the run API should be at."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok", "runs": [{"id": 5}]}')

    do_POST = do_GET


@pytest.mark.parametrize(
    "action", [["list"], ["status", "run-1"], ["stop", "run-1"], ["download", "run-1"]]
)
def test_runs_is_not_fooled_by_another_json_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    """README: `runs` exits 2, one line, when something other than the server's ops port
    answers at [ops] listen; JSON of another shape was a KeyError traceback (exit 1), and
    `download` wrote the other API's answer as the run's model."""
    with _serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtherJsonApi)) as port:
        (tmp_path / "token").write_text("a-long-random-admin-token\n")
        cfg = tmp_path / "server.toml"
        cfg.write_text(f'[ops]\nlisten = "127.0.0.1:{port}"\nadmin_token = "token"\n')
        out = ["--out", str(tmp_path / "run-1.pt")] if action[0] == "download" else []
        code = main(["runs", *action, "--config", str(cfg), *out])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not as an sl-pipeline server's ops port" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run-1.pt").exists()


def _closed_port(host: str) -> int:
    """A port on ``host`` that nothing listens on (bound, then closed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("wildcard", "loopback"), [("0.0.0.0", "127.0.0.1"), ("::", "::1")])
def test_health_and_runs_call_the_loopback_of_a_wildcard_listen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], wildcard: str, loopback: str
) -> None:
    """`health` and `runs` call the same address for an [ops] listen on every interface: this
    machine's loopback of that family. `health` took "::" as the address to call (it named
    http://[::]:PORT, which only Linux routes to this machine) where `runs` called [::1]."""
    # Prepare: nothing listens; each command names the address it called
    port = _closed_port(loopback)
    listen = f"[{wildcard}]:{port}" if ":" in wildcard else f"{wildcard}:{port}"
    (tmp_path / "token").write_text("a-long-random-admin-token\n")
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[ops]\nlisten = "{listen}"\nadmin_token = "token"\n')
    url = f"http://[{loopback}]:{port}" if ":" in loopback else f"http://{loopback}:{port}"
    # Execute
    health = main(["health", "--config", str(cfg), "--timeout", "5"])
    health_err = capsys.readouterr().err
    runs = main(["runs", "list", "--config", str(cfg)])
    runs_err = capsys.readouterr().err
    # Assert
    assert health == 1 and f"no worker answers at {url} " in health_err, health_err
    assert runs == 2 and f"no server answers at {url} " in runs_err, runs_err


class _ReadyWorker(_NotAWorker):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ready": true}')


class _Ipv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_health_of_a_worker_listening_on_every_ipv6_interface(tmp_path: Path) -> None:
    """A worker whose [ops] listen is "[::]:PORT" is healthy: `health` calls [::1]."""
    with _serving(_Ipv6Server(("::1", 0), _ReadyWorker)) as port:
        cfg = tmp_path / "server.toml"
        cfg.write_text(f'[ops]\nlisten = "[::]:{port}"\n')
        code = main(["health", "--config", str(cfg), "--timeout", "5"])
    assert code == 0
