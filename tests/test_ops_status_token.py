"""`[ops] status_token_file`: the token /status asks for before it names peers, kept in a
file (as the metrics token is) rather than written in the config. Through
``workers.cli.main`` and real loopback HTTP against workers started from their configs."""

from __future__ import annotations

import asyncio
import json
import stat
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.scrape import listening, metrics_token, scrape, scrape_until_finished
from workers.cli import main
from workers.ops.http import local_url
from workers.tools.inprocess import run_deployment


def status_token(folder: Path) -> str:
    return (folder / "keys" / "status.token").read_text().strip()


@pytest.fixture
def deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """`sl-pipeline init --ops` of one client."""
    folder = tmp_path / "d"
    argv = ["init", str(folder), "--ops", "--clients", "1", "--dataset", "breast_cancer"]
    assert main([*argv, "--epochs", "1"]) == 0
    capsys.readouterr()
    return folder


async def test_init_keeps_the_status_token_in_a_file_and_status_names_peers_for_it(
    deployment: Path,
) -> None:
    """Before: init wrote no status token at all, and the only way to give one was inline,
    a secret in a config file that init writes readable by every user."""
    # Assert: every worker's config names the file, none holds the token itself
    files = {name: deployment / f"{name}.toml" for name in ("server", "client-1")}
    for name, path in files.items():
        ops = tomllib.loads(path.read_text())["ops"]
        assert ops["status_token_file"] == "keys/status.token" and "status_token" not in ops
        assert status_token(deployment) not in path.read_text(), name
    token_file = deployment / "keys" / "status.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = status_token(deployment)
    assert len(token) >= 16 and token != metrics_token(deployment)
    # Execute: /status of the server, with the file's token and without, while it trains
    base = local_url(tomllib.loads(files["server"].read_text())["ops"]["listen"])
    client = local_url(tomllib.loads(files["client-1"].read_text())["ops"]["listen"])
    run = asyncio.ensure_future(run_deployment(files, "ops.linger_s=60"))
    await asyncio.wait_for(listening(f"{base}/status", run), 60)
    named = ""
    for _ in range(500):  # bounded: until the client's session shows, 500 x (GET + 20 ms)
        named = (await scrape(f"{base}/status", token))[1]
        if "client-1" in named or run.done():
            break
        await asyncio.sleep(0.02)
    stranger = (await scrape(f"{base}/status"))[1]
    await scrape_until_finished(f"{client}/metrics", metrics_token(deployment), run)
    await asyncio.wait_for(run, 30)
    # Assert: the token names the peers; without it, none
    assert "client-1" in named and "redacted" not in json.loads(named), named
    assert "client-1" not in stranger and "redacted" in json.loads(stranger), stranger
    assert "([ops] status_token_file)" in json.loads(stranger)["redacted"], stranger


def _placeholder() -> str:
    secret = (ROOT / "deploy" / "k8s" / "secret.yaml").read_text()
    return next(line.split('"')[1] for line in secret.splitlines() if "status.token:" in line)


@pytest.mark.parametrize(
    ("token", "named"),
    [
        ("s3cret", "ops.status_token_file = 'keys/status.token': the token is shorter"),
        ("METRICS", "ops.status_token_file is the token of ops.metrics_token"),
        ("PLACEHOLDER", "holds the example's placeholder"),
    ],
)
def test_a_status_token_file_others_hold_or_could_guess_is_refused(
    deployment: Path, capsys: pytest.CaptureFixture[str], token: str, named: str
) -> None:
    """The file form is checked as the inline token and the metrics token's file are."""
    # Prepare
    written = {"METRICS": metrics_token(deployment), "PLACEHOLDER": _placeholder()}.get(
        token, token
    )
    (deployment / "keys" / "status.token").write_text(written + "\n")
    # Execute: the client (no server runs: were it taken, it would give up after 1 s)
    argv = ["client", "--config", str(deployment / "client-1.toml")]
    code = main([*argv, "--set", "client.retry_for_s=1"])
    # Assert: refused in one line naming the setting, the token not echoed
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert named in err and (token != "METRICS" or written not in err), err


def test_a_server_refuses_its_admin_token_in_the_status_token_file(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = (deployment / "keys" / "admin.token").read_text()
    (deployment / "keys" / "status.token").write_text(admin)
    code = main(["server", "--config", str(deployment / "server.toml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "ops.status_token_file is the token of ops.admin_token" in err, err
    assert admin.strip() not in err, err


def test_a_status_token_both_inline_and_in_a_file_is_refused(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inline = "an-inline-status-token-0123456789"
    argv = ["client", "--config", str(deployment / "client-1.toml")]
    code = main([*argv, "--set", f'ops.status_token="{inline}"', "--set", "client.retry_for_s=1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "ops.status_token and ops.status_token_file are both set" in err, err
    assert inline not in err, err


def test_a_status_token_file_every_user_may_read_is_warned_about(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (deployment / "keys" / "status.token").chmod(0o644)
    argv = ["client", "--config", str(deployment / "client-1.toml")]
    main([*argv, "--set", "client.retry_for_s=1"])  # no server runs: it gives up
    err = capsys.readouterr().err
    assert "ops.status_token_file" in err and "readable by every user" in err, err
    assert "chmod 600" in err, err


def test_the_inline_status_token_still_works_and_refuses_the_placeholder(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The inline form stays (configs written before the file form), with the placeholder
    check the file form has."""
    argv = ["client", "--config", str(deployment / "client-1.toml"), "--set"]
    unset = 'ops.status_token_file=""'
    code = main([*argv, unset, "--set", f'ops.status_token="{_placeholder()}"'])
    err = capsys.readouterr().err
    assert code == 2 and "ops.status_token holds the example's placeholder" in err, err


def test_provision_gives_each_site_with_an_ops_port_a_status_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each site's own token (0600), the server's copied to the operator's admin kit."""
    project = tmp_path / "project.toml"
    assert main(["provision", "--example", str(project)]) == 0
    out = tmp_path / "kits"
    assert main(["provision", str(project), "--out", str(out)]) == 0
    capsys.readouterr()
    sites = [p.parent.parent for p in out.glob("*/keys/metrics.token")]
    assert sites, "no site has an ops port"
    tokens = {site.name: status_token(site) for site in sites}
    assert len(set(tokens.values())) == len(sites)
    assert (out / "admin" / "status.token").read_text().strip() == tokens["server"]
    for site in sites:
        config = next(p for p in site.glob("*.toml"))
        ops = tomllib.loads(config.read_text())["ops"]
        assert ops["status_token_file"] == "keys/status.token" and "status_token" not in ops
        assert stat.S_IMODE((site / "keys" / "status.token").stat().st_mode) == 0o600
