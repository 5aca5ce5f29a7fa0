"""Every start-up and connection failure is one line naming the cause and what to do,
through the command line, with its documented exit status."""

from __future__ import annotations

import io
import socket
import tomllib
from pathlib import Path

import pytest
import torch

from sl_pipeline.keys import write_keypair
from workers.cli import main
from workers.ops.logs import configure_logging
from workers.tools.localdeploy import free_port

from .threadserver import ThreadServer

FAST = ("--set", "client.retry_for_s=1", "--set", "client.connect_timeout_s=0.3")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    # main() logs to the captured stderr; the server thread outlives the capture
    configure_logging("text", "INFO", stream=io.StringIO())
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("key", "value"),
    [("ops.listen", "127.0.0.1:{port}"), ("server.bind", "tcp://127.0.0.1:{port}")],
)
def test_port_in_use(deployment, capsys: pytest.CaptureFixture[str], key: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """Either port held by another process is a config problem (exit 2) naming the key."""
    files = deployment(dataset="breast_cancer")
    site = files["server"].parent
    before = sorted(site.rglob("*"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        value = value.format(port=taken.getsockname()[1])
        sets = ("--set", f'{key}="{value}"')
        code, err = _run(capsys, "server", "--config", str(files["server"]), *sets)
    assert code == 2
    assert f"{key} = {value!r}: cannot listen there" in err
    section, name = key.split(".")
    assert f"choose another port in [{section}] {name}" in err
    # nothing left on disk: was an empty checkpoint folder with its lock, and the runs folder
    assert sorted(site.rglob("*")) == before


@pytest.mark.parametrize(
    ("key", "value"),
    [("ops.listen", "192.0.2.1:{port}"), ("server.bind", "tcp://192.0.2.1:{port}")],
)
def test_an_address_this_machine_does_not_have(  # type: ignore[no-untyped-def]
    deployment, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    """A documentation-range address (RFC 5737) no machine here holds: the bind is refused
    by the kernel, nothing is sent; the advice is the address, not a port in use."""
    files = deployment(dataset="breast_cancer")
    value = value.format(port=free_port())
    sets = ("--set", f'{key}="{value}"')
    code, err = _run(capsys, "server", "--config", str(files["server"]), *sets)
    assert code == 2
    section, name = key.split(".")
    assert f"this machine has no address 192.0.2.1: set [{section}] {name}" in err, err
    assert "holds the port" not in err


def test_saved_state_that_does_not_fit_the_model(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    saved = files["server"].parent / "state" / "server.pt"
    saved.parent.mkdir(parents=True)
    torch.save({"0.weight": torch.zeros(3, 3)}, saved)  # another model's segment
    code, err = _run(capsys, "server", "--config", str(files["server"]))
    assert code == 2
    assert "server.save = 'state/server.pt'" in err and "does not fit this server's model" in err
    assert "move the file away" in err


def test_wrong_pinned_server_key(deployment, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    client = str(files["client-1"])
    with ThreadServer(files["server"]):
        sets = ("--set", 'client.server_key="keys/client-1.pub"')
        code, err = _run(capsys, "client", "--config", client, *sets, *FAST)
    assert code == 2
    # The connection gate cannot tell this from a key it does not admit: both are named
    assert "client.server_key = 'keys/client-1.pub' is not that server's public key" in err
    assert "does not admit this client's key" in err


def test_client_key_not_admitted(deployment, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    write_keypair("stranger", files["server"].parent / "other")
    sets = ("--set", 'client.key="other/stranger.key"')
    with ThreadServer(files["server"]):
        code, err = _run(capsys, "client", "--config", str(files["client-1"]), *sets, *FAST)
    assert code == 2 and "does not admit this client's key" in err


def test_wrong_port(deployment, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", ops=True)
    client = str(files["client-1"])
    nothing = ("--set", f'client.server="tcp://127.0.0.1:{free_port()}"')
    code, err = _run(capsys, "client", "--config", client, *nothing, *FAST)
    assert code == 2 and "nothing listens there (connection refused)" in err
    # a client of a multihop deployment names a relay's port: the line names both ends
    assert "start the server first (or the relay, " in err and "a relay's [relay] bind" in err
    ops = tomllib.loads(files["server"].read_text())["ops"]["listen"]
    with ThreadServer(files["server"]):  # its ops (HTTP) port is not its protocol port
        http = ("--set", f'client.server="tcp://{ops}"')
        code, err = _run(capsys, "client", "--config", client, *http, *FAST)
    assert code == 2 and "answered no sl-pipeline handshake" in err
    assert "server's ops (HTTP) port" in err


def test_health_of_a_stopped_worker(deployment, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", ops=True)
    code, err = _run(capsys, "health", "--config", str(files["server"]), "--timeout", "1")
    assert code == 1
    assert "not ready: no worker answers at http://127.0.0.1:" in err
    assert "(connection refused): it is stopped" in err
    with ThreadServer(files["server"]):
        code, _ = _run(capsys, "health", "--config", str(files["server"]))
    assert code == 0


def test_exit_statuses_are_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for status in (0, 1, 2, 3, 4, 5, 6, 130):
        assert f"| {status} |" in readme, f"exit status {status} is not in README.md"


def test_a_refused_start_keeps_what_was_there(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Only folders the refused start made go; a folder that was there stays, with its files."""
    files = deployment(dataset="breast_cancer")
    state = files["server"].parent / "state"
    state.mkdir()
    (state / "notes.txt").write_text("the operator's")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f'server.bind="tcp://127.0.0.1:{taken.getsockname()[1]}"'
        code, _ = _run(capsys, "server", "--config", str(files["server"]), "--set", bind)
    assert code == 2
    assert [p.name for p in state.iterdir()] == ["notes.txt"]
    assert (state / "notes.txt").read_text() == "the operator's"


def test_a_start_refused_for_its_config_leaves_nothing_either(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """A refusal after the output folders were made (here a missing token file) removes
    them too (the red team's: it left ``state/`` and ``state/runs/``)."""
    files = deployment(dataset="breast_cancer")
    site = files["server"].parent
    before = sorted(site.rglob("*"))
    missing = 'ops.admin_token="keys/no-such.token"'
    code, err = _run(capsys, "server", "--config", str(files["server"]), "--set", missing)
    assert code == 2 and "ops.admin_token" in err, err
    assert sorted(site.rglob("*")) == before


def test_a_path_through_dot_dot_removes_only_what_the_start_made(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """``x/../shared``: ``shared`` was the operator's (empty) folder; counted as made by the
    refused start, it was removed (the red team's)."""
    files = deployment(dataset="breast_cancer")
    site = files["server"].parent
    for name in ("shared", "shared2"):
        (site / name).mkdir()
    before = sorted(site.rglob("*"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sets = (
            "--set", 'checkpoint.dir="x/../shared/ckpt"',
            "--set", 'server.save="y/../shared2/server.pt"',
            "--set", f'server.bind="tcp://127.0.0.1:{taken.getsockname()[1]}"',
        )  # fmt: skip
        code, _ = _run(capsys, "server", "--config", str(files["server"]), *sets)
    assert code == 2
    assert sorted(site.rglob("*")) == before


def test_a_relay_refused_for_its_port_leaves_nothing(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="multihop", dataset="breast_cancer")
    site = files["relay-1"].parent
    before = sorted(site.rglob("*"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f'relay.bind="tcp://127.0.0.1:{taken.getsockname()[1]}"'
        code, err = _run(capsys, "relay", "--config", str(files["relay-1"]), "--set", bind)
    assert code == 2 and "choose another port in [relay] bind" in err
    assert sorted(site.rglob("*")) == before  # was its save folder, state/
