"""`sl-pipeline provision`: one kit per site, no site holding another's private key, and the
kits train together."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from tests.scrape import listening, metrics_token, scrape, scrape_until_finished
from workers.cli import main
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.localdeploy import free_port

PROJECT = """
[project]
name = "study"
topology = "{topology}"
dataset = "breast_cancer"
epochs = 1

[server]
host = "127.0.0.1"
port = {port}
ops_port = {ops}

[[client]]
name = "site-a"

[[client]]
name = "site-b"
ops_port = {client_ops}
{relay}"""
RELAY = '\n[[relay]]\nname = "hop"\nhost = "127.0.0.1"\nport = {port}\nops_port = {ops}\n'


def _provision(tmp_path: Path, topology: str = "vanilla", hops: int = 0) -> tuple[Path, str]:
    relay = RELAY.format(port=free_port(), ops=free_port()) if hops else ""
    project = tmp_path / "project.toml"
    project.write_text(
        PROJECT.format(
            topology=topology,
            port=free_port(),
            ops=free_port(),
            client_ops=free_port(),
            relay=relay,
        )
    )
    out = tmp_path / "kits"
    return out, str(project)


def _private_keys(out: Path) -> dict[str, str]:
    """site -> the secret part of its private key file."""
    return {
        site.name: (site / "keys" / f"{site.name}.key").read_text().split()[-1]
        for site in out.iterdir()
        if (site / "keys" / f"{site.name}.key").exists()
    }


@pytest.mark.parametrize(
    ("topology", "hops", "group_secret", "masks"),  # relays, a shared secret, SplitFed's keys
    [
        ("vanilla", 0, False, 0),
        ("multihop", 1, False, 0),
        ("splitfed", 0, False, 4),
        ("roundrobin", 0, True, 0),
    ],
)
def test_no_kit_holds_another_sites_private_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    topology: str,
    hops: int,
    group_secret: bool,
    masks: int,
) -> None:
    out, project = _provision(tmp_path, topology, hops)
    assert main(["provision", project, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    sites = {"server", "site-a", "site-b", "admin"} | ({"hop"} if hops else set())
    assert {p.name for p in out.iterdir()} == sites
    secrets = _private_keys(out)
    assert set(secrets) == sites - {"admin"}
    for site in out.iterdir():
        files = [f for f in site.rglob("*") if f.is_file()]
        assert [f.name for f in files if f.suffix == ".key"] == (
            [f"{site.name}.key"] if site.name != "admin" else []
        )
        for other, secret in secrets.items():
            if other != site.name:
                leaked = [f for f in files if secret in f.read_text(errors="replace")]
                assert not leaked, f"{site.name} holds {other}'s private key in {leaked}"
        if site.name != "admin":
            script = site / "start.sh"
            assert os.access(script, os.X_OK) and f"sh {script}" in printed
    server = load(ServerConfig, out / "server" / "server.toml")
    assert server.checkpoint.dir and server.checkpoint.fsync  # checkpointed by default
    for name in ("site-a", "site-b"):  # and each client, every step: a kill -9 costs nothing
        ckpt = load(ClientConfig, out / name / f"{name}.toml").checkpoint
        assert (ckpt.dir, ckpt.every_steps, ckpt.fsync) == ("state/client-checkpoints", 1, True)
    admitted = {p.name for p in (out / "server" / "keys" / "admitted").iterdir()}
    assert admitted == ({"hop.pub"} if hops else {"site-a.pub", "site-b.pub"})
    group = [f for f in out.rglob("group.secret")]  # a secret the clients share, not the server
    assert sorted(f.parent.parent.name for f in group) == (
        ["site-a", "site-b"] if group_secret else []
    )
    found = [f for f in out.rglob("*") if f.parent.name == "group"]  # splitfed: public keys only
    assert all(f.suffix == ".pub" for f in found)
    assert len(found) == masks


def test_provision_refuses_a_bad_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "p.toml"
    project.write_text('[project]\ntopology = "vanilla"\n[[client]]\nname = "server"\n')
    assert main(["provision", str(project), "--out", str(tmp_path / "o")]) == 2
    assert "not server/admin" in capsys.readouterr().err
    project.write_text('[project]\ncolour = "red"\n')
    assert main(["provision", str(project), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key 'project.colour'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "named"),
    [
        # it said "site name ''"
        ('[[client]]\nname = "a"\n[[client]]\nhost = "h"\n', "[[client]] number 2 has no name"),
        # it said "--dataset 'mnist'", a flag nobody gave
        ('[project]\ndataset = "mnist"\n[[client]]\nname = "a"\n', "project.dataset = 'mnist'"),
        ('[project]\ntopology = "star"\n[[client]]\nname = "a"\n', "project.topology = 'star'"),
        # accepted: the server then could not start
        (
            '[server]\nport = 9100\nops_port = 9100\n[[client]]\nname = "a"\n',
            "the server ops_port and the server port are both 127.0.0.1:9100",
        ),
        (
            '[[client]]\nname = "a"\nops_port = 9200\n[[client]]\nname = "b"\nops_port = 9200\n',
            "the 'b' ops_port and the 'a' ops_port are both 127.0.0.1:9200",
        ),
    ],
)
def test_provision_names_the_projects_own_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    project = tmp_path / "p.toml"
    project.write_text(text)
    assert main(["provision", str(project), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert "--dataset" not in err and not (tmp_path / "o").exists()


def _read(request: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(request, timeout=10) as answer:
        return bytes(answer.read())


async def test_provisioned_kits_train_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, project = _provision(tmp_path)
    assert main(["provision", project, "--out", str(out)]) == 0
    server_dir = out / "server"
    cfg = tomllib.loads((server_dir / "server.toml").read_text())
    loopback = [  # the kits bind every interface; a test stays on loopback
        f'server.bind="{cfg["server"]["bind"].replace("0.0.0.0", "127.0.0.1")}"',
        f'ops.listen="{cfg["ops"]["listen"].replace("0.0.0.0", "127.0.0.1")}"',
    ]
    server = ServerWorker(load(ServerConfig, server_dir / "server.toml", loopback), server_dir)
    # site-b's ops port, on loopback; it waits (60 s at most) for a scrape of its finish
    listen = f"127.0.0.1:{free_port()}"
    site_b = f"http://{listen}/metrics"
    ops = {"site-a": [], "site-b": [f'ops.listen="{listen}"', "ops.linger_s=60"]}
    clients = [
        ClientWorker(load(ClientConfig, out / s / f"{s}.toml", ops[s]), out / s, progress=False)
        for s in ("site-a", "site-b")
    ]
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    runs = asyncio.gather(*(c.run() for c in clients))
    try:
        # site-b's Prometheus sends the kit's own token; the server's, or none, is refused
        await asyncio.wait_for(listening(site_b, runs), 60)
        own, server_token = metrics_token(out / "site-b"), metrics_token(server_dir)
        refused = [await scrape(site_b, token) for token in (None, server_token)]
        body, _ = await scrape_until_finished(site_b, own, runs)
        summaries = await asyncio.wait_for(runs, 120)
        assert [status for status, _ in refused] == [401, 401]
        assert 'worker="client"' in body
        capsys.readouterr()
        admin = ["runs", "list", "--config", str(out / "admin" / "admin.toml"), "--json"]
        assert await asyncio.to_thread(main, admin) == 0  # the operator's kit reaches it
        assert json.loads(capsys.readouterr().out)["runs"][0]["state"] == "finished"
        # the operator's Prometheus reads the server's /metrics with the kit's metrics.token
        token = (out / "admin" / "metrics.token").read_text().strip()
        url = f"http://{server.cfg.ops.listen}/metrics"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        assert b"sl_run_steps" in await asyncio.to_thread(_read, request)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            await asyncio.to_thread(_read, urllib.request.Request(url))
    finally:
        stop.set()
        await task
        for client in clients:  # done already, unless the test failed before their end
            client.stop.set()
        await asyncio.wait_for(asyncio.gather(runs, return_exceptions=True), 30)
    assert all(s["steps"] > 0 for s in summaries)
    assert server.book.runs["run-1"].state == "finished"
    assert tomllib.loads((out / "admin" / "admin.toml").read_text())["ops"]["admin_token"]


def test_each_site_with_an_ops_port_holds_a_metrics_token_of_its_own(tmp_path: Path) -> None:
    """A client's /metrics shows its training to whoever reaches its port (before: open on
    every interface); each site runs its own Prometheus, holding its own token alone."""
    # Execute: a multihop project; the server, the relay and site-b have ops ports
    out, project = _provision(tmp_path, "multihop", hops=1)
    assert main(["provision", project, "--out", str(out)]) == 0
    # Assert: each of them holds a token file of its own, its owner's alone, that its config
    # names and its start.sh tells the site's Prometheus to send; site-a, no ops port, none
    tokens = {site: metrics_token(out / site) for site in ("server", "hop", "site-b")}
    operator = (out / "admin" / "metrics.token").read_text().strip()  # the server's copy
    assert len(set(tokens.values())) == 3 and tokens["server"] == operator
    for site, config in (("server", "server"), ("hop", "hop"), ("site-b", "site-b")):
        token_file = out / site / "keys" / "metrics.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        ops = tomllib.loads((out / site / f"{config}.toml").read_text())["ops"]
        assert ops["metrics_token"] == "keys/metrics.token", (site, ops)
        assert "keys/metrics.token" in (out / site / "start.sh").read_text()
    assert not (out / "site-a" / "keys" / "metrics.token").exists()
    assert "ops" not in tomllib.loads((out / "site-a" / "site-a.toml").read_text())


def test_relay_kit_loads(tmp_path: Path) -> None:
    out, project = _provision(tmp_path, "multihop", hops=1)
    assert main(["provision", project, "--out", str(out)]) == 0
    relay = load(RelayConfig, out / "hop" / "hop.toml")
    assert relay.relay.name == "hop" and relay.relay.upstream_key == "keys/server.pub"


def test_the_example_project_provisions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project.toml"
    assert main(["provision", "--example", str(project)]) == 0
    assert main(["provision", str(project), "--out", str(tmp_path / "kits")]) == 0
    assert set(_private_keys(tmp_path / "kits")) == {"server", "client-1", "client-2"}
    assert main(["provision", "--example", str(project)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_a_project_of_more_sites_than_the_default_server_limit_admits_them_all(
    tmp_path: Path,
) -> None:
    # Prepare: a project of 65 client sites (the server admits 64 unless told more)
    sites = "".join(f'\n[[client]]\nname = "site-{i}"\n' for i in range(65))
    project = tmp_path / "big.toml"
    project.write_text(f'[project]\nname = "big"\ntopology = "vanilla"\n{sites}')
    # Execute
    assert main(["provision", str(project), "--out", str(tmp_path / "kits")]) == 0
    # Assert: the server's config admits every site (before, the 65th waited forever)
    server = load(ServerConfig, tmp_path / "kits" / "server" / "server.toml", [])
    assert server.server.max_clients == 65
