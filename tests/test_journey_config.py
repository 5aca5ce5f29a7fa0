"""A worker's config as a user gets it wrong, through ``workers.cli.main``: one line naming
the key or file and what to do, exit status 2, and never a blame on the wrong thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli_bad_input_journey import _refused


def test_a_set_of_another_roles_key_names_the_key_not_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a client's file; the user passes a server key with --set
    cfg = tmp_path / "client-1.toml"
    cfg.write_text('[client]\nserver = "tcp://127.0.0.1:1"\n[data]\ndataset = "digits"\n')
    argv = ["client", "--config", str(cfg), "--insecure", "--set", "server.bind=x"]
    # Execute / Assert: it said the file "is a server's config (it has a [server] section)"
    err = _refused(argv, capsys, "unknown key 'server'")
    assert "server's config" not in err, err


@pytest.mark.parametrize("port", [0, 65536])
def test_a_port_out_of_range_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\nbind = "tcp://127.0.0.1:{port}"\n')
    # it said "is not a TCP endpoint; write it as tcp://HOST:PORT", which it was
    err = _refused(["server", "--config", str(cfg), "--insecure"], capsys, "server.bind")
    assert f"port {port} is out of range" in err and "1 to 65535" in err, err


def _runs_config(tmp_path: Path) -> Path:
    (tmp_path / "admin.token").write_text("t" * 32)
    cfg = tmp_path / "server.toml"
    cfg.write_text('[ops]\nlisten = "127.0.0.1:1"\nadmin_token = "admin.token"\n')
    return cfg


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["list", "run-1"], "runs list takes no run id"),  # it listed every run
        (["status", "../etc"], "is not a run id"),  # the server answered "404: Not Found"
        (["download", "run-1/../x"], "is not a run id"),
        (["stop", "a:b:c"], "is not a run id"),
        (["status", "hospital:trial"], "no server answers"),  # GROUP:RUN: asked for
    ],
)
def test_runs_arguments_are_checked_before_calling_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    # nothing listens at 127.0.0.1:1: without the check, each said it found no server
    cfg = _runs_config(tmp_path)
    _refused(["runs", *argv, "--config", str(cfg)], capsys, named)


def test_a_private_key_pinned_as_the_servers_is_named_as_such(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer")
    private = files["server"].parent / "keys" / "server.key"
    argv = ["client", "--config", str(files["client-1"]), "--set", f'client.server_key="{private}"']
    # it said the public key file was garbled
    err = _refused(argv, capsys, "is a private key")
    assert "server.pub" in err and "garbled" not in err, err


def test_a_key_path_that_is_a_folder_says_what_to_name(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer")
    keys = files["server"].parent / "keys"
    argv = ["server", "--config", str(files["server"]), "--set", f'server.key="{keys}"']
    # it said "cannot read private key file ...: Is a directory", and no more
    err = _refused(argv, capsys, "is a folder: name the key file in it")
    assert "NAME.key" in err, err
