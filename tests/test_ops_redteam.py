"""Red team of the ops port's tokens (2026-12-01): what a stranger who reaches a worker's ops
port learns without them, and the operator mistakes a worker refuses. Through
``workers.cli.main`` and real loopback HTTP against workers started from their configs."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.scrape import listening, metrics_token, scrape, scrape_until_finished
from workers.cli import main
from workers.ops.http import local_url
from workers.tools.inprocess import run_deployment

FIGURES = ("last_loss", "last_accuracy", "privacy", "steps_applied", "epsilon", "step")


async def test_status_without_a_token_shows_no_training_figure_nor_name(tmp_path: Path) -> None:
    """Before: /metrics asked for the token, but a client's /status gave anyone its name,
    loss, accuracy and privacy budget, and the server's its loss and steps."""
    # Prepare: `sl-pipeline init --ops`, every worker's /metrics behind the one token
    folder = tmp_path / "d"
    argv = ["init", str(folder), "--ops", "--clients", "1", "--dataset", "breast_cancer"]
    assert await asyncio.to_thread(main, [*argv, "--epochs", "1"]) == 0
    files = {name: folder / f"{name}.toml" for name in ("server", "client-1")}
    ops = {n: tomllib.loads(p.read_text())["ops"] for n, p in files.items()}
    base = {name: local_url(o["listen"]) for name, o in ops.items()}
    token = metrics_token(folder)
    run = asyncio.ensure_future(run_deployment(files, "ops.linger_s=60"))
    # Execute: /status of each without a token, and with the metrics token, while the
    # client trains; then let it finish (a scrape with the token ends its linger)
    await asyncio.wait_for(listening(f"{base['client-1']}/metrics", run), 60)
    strangers = {name: await scrape(f"{url}/status") for name, url in base.items()}
    await scrape_until_finished(f"{base['client-1']}/metrics", token, run)
    scraper = await scrape(f"{base['server']}/status", token)
    await asyncio.wait_for(run, 30)
    # Assert: the role, no figure, no name; the metrics token (Prometheus's) shows figures
    for name, (status, text) in strangers.items():
        body = json.loads(text)
        assert status == 200 and body["role"] in ("server", "client"), text
        assert not set(FIGURES) & set(body), (name, text)
        assert "client-1" not in text and "redacted" in body, (name, text)
    assert scraper[0] == 200 and "steps_applied" in json.loads(scraper[1])
    assert "client-1" not in scraper[1]


@pytest.fixture
def multihop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """`sl-pipeline init --ops` of a relay and a client: every worker's /metrics asks for
    keys/metrics.token."""
    folder = tmp_path / "d"
    assert main(["init", str(folder), "--ops", "--topology", "multihop", "--clients", "1"]) == 0
    capsys.readouterr()
    return folder


@pytest.mark.parametrize("role", ["client-1", "relay-1"])
@pytest.mark.parametrize(
    ("status_token", "named"),
    [
        (None, "ops.status_token is the token of ops.metrics_token"),  # Prometheus holds it
        ("s3cret", "ops.status_token is shorter than 16 characters"),
    ],
)
def test_a_client_or_relay_refuses_a_status_token_others_hold_or_could_guess(
    multihop: Path,
    capsys: pytest.CaptureFixture[str],
    role: str,
    status_token: str | None,
    named: str,
) -> None:
    """Before: only a server refused its metrics token as its status token, and no worker a
    short one; a client or relay started, and whoever scraped (or guessed) read its names."""
    # Execute
    token = status_token or metrics_token(multihop)
    kind = role.split("-")[0]
    inline = ["--set", 'ops.status_token_file=""', "--set", f'ops.status_token="{token}"']
    settings = [*inline, "--set", "client.retry_for_s=1"]
    code = main(
        [
            kind,
            "--config",
            str(multihop / f"{role}.toml"),
            *settings[: 6 if kind == "client" else 4],
        ]
    )
    # Assert: refused in one line, naming the setting, the token not echoed
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert named in err and token not in err, err


def test_a_token_given_inline_is_refused_without_echoing_it(
    multihop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the error line (in the worker's log, its journal, its container's log) read
    `ops.metrics_token = '<the token>': no such file or directory`."""
    token = metrics_token(multihop)
    argv = ["server", "--config", str(multihop / "server.toml")]
    code = main([*argv, "--set", f'ops.metrics_token="{token}"'])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "looks like a token itself" in err and token not in err, err


def test_a_token_file_every_user_may_read_is_warned_about(
    multihop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a `chmod 644` metrics.token was read without a word (a private key so is
    warned about); any user of the machine could read every worker's figures with it."""
    (multihop / "keys" / "metrics.token").chmod(0o644)
    argv = ["client", "--config", str(multihop / "client-1.toml"), "--set", "client.retry_for_s=1"]
    main(argv)  # no relay runs: it gives up after its second
    err = capsys.readouterr().err
    assert "ops.metrics_token" in err and "readable by every user" in err, err
    assert "chmod 600" in err, err


def test_a_server_refuses_its_admin_token_as_its_status_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: it started, and whoever was given the status token (written inline in the
    config, which init writes readable by every user) could stop and download runs."""
    assert main(["init", str(tmp_path / "d"), "--ops", "--clients", "1"]) == 0
    capsys.readouterr()
    admin = (tmp_path / "d" / "keys" / "admin.token").read_text().strip()
    argv = ["server", "--config", str(tmp_path / "d" / "server.toml")]
    inline = ["--set", 'ops.status_token_file=""', "--set", f'ops.status_token="{admin}"']
    code = main([*argv, *inline])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "ops.status_token is the token of ops.admin_token" in err and admin not in err, err


def test_the_kubernetes_examples_placeholder_token_is_refused(
    multihop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: deploy/k8s/secret.yaml applied with its keys replaced but not its token gave
    every worker a metrics token anyone can read in this repository (27 characters, long
    enough for the length check)."""
    # Prepare: the Secret's placeholder, installed as its init container installs it
    secret = (ROOT / "deploy" / "k8s" / "secret.yaml").read_text()
    placeholder = next(
        line.split('"')[1] for line in secret.splitlines() if "metrics.token:" in line
    )
    (multihop / "keys" / "metrics.token").write_text(placeholder + "\n")
    # Execute
    code = main(["relay", "--config", str(multihop / "relay-1.toml")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "ops.metrics_token" in err and "placeholder" in err, err
