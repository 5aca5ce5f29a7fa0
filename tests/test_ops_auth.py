"""Who may read ``/metrics``, and what its labels say: ``[ops] metrics_token`` (a bearer token
Prometheus sends from its ``credentials_file``) and ``[ops] label_names = "hashed"`` (run ids
and client names, which may name a hospital or a bank, as keyed hashes). Over real loopback
HTTP, the CLI through ``workers.cli.main``, and a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import stat
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sl_pipeline.config import ServerConfig, load
from tests.conftest_prometheus import query_until, start_prometheus, stop_prometheus
from tests.scrape import listening, metrics_token, scrape, scrape_until_finished
from workers.cli import main
from workers.ops.http import OpsServer, check_health, local_url
from workers.ops.metrics import WorkerMetrics
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment

TIMEOUT_S = 10.0
TOKEN = "metrics-token-0123456789abcdef"
SECRET = b"k" * 32  # stands for the worker's private key


@pytest.fixture
async def ops() -> AsyncIterator[OpsServer]:
    metrics = WorkerMetrics("server", CollectorRegistry(), version="1")
    metrics.hash_names(SECRET)
    metrics.record_run("hospital:trial", 3, True)
    assert metrics.clients is not None
    metrics.clients.joined("hospital-a")
    args = ("127.0.0.1", 0, None, "status-token-0123456789", TOKEN)
    server = OpsServer(metrics, lambda: {"role": "server"}, lambda: True, *args)
    await asyncio.wait_for(server.start(), TIMEOUT_S)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT_S)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def test_metrics_answers_only_the_token_and_a_refusal_is_no_scrape(ops: OpsServer) -> None:
    # Execute: no token, a wrong one, the right one
    answers = [
        await asyncio.to_thread(_get, f"{ops.url}/metrics", token)
        for token in (None, "wrong-token-0123456789abcdef", TOKEN)
    ]
    # Assert: two 401s saying what is missing in one line, then the figures; only the answered
    # scrape counts (a finished client waits for one that carried its figures)
    assert [status for status, _ in answers[:2]] == [401, 401]
    assert answers[0][1].decode().count("\n") == 1 and b"metrics_token" in answers[0][1]
    assert answers[2][0] == 200 and b"sl_build_info" in answers[2][1]
    assert ops.scrapes == 1
    assert (await asyncio.to_thread(_get, f"{ops.url}/healthz"))[0] == 200  # others stay open


async def test_hashed_labels_name_no_tenant_and_status_with_its_token_maps_them(
    ops: OpsServer,
) -> None:
    # Execute
    _, body = await asyncio.to_thread(_get, f"{ops.url}/metrics", TOKEN)
    _, full = await asyncio.to_thread(_get, f"{ops.url}/status", "status-token-0123456789")
    _, redacted = await asyncio.to_thread(_get, f"{ops.url}/status")
    # Assert: no tenant's name on /metrics; the operator's /status says which hash is whom
    text = body.decode()
    assert "hospital" not in text
    run, client = ops.metrics.names("hospital:trial"), ops.metrics.names("hospital-a")
    assert f'sl_run_steps{{run="{run}"}} 3.0' in text
    assert f'sl_client_connected{{client="{client}"}} 1.0' in text
    assert json.loads(full)["labels"] == {run: "hospital:trial", client: "hospital-a"}
    assert "labels" not in json.loads(redacted)


def test_hashed_labels_are_stable_under_one_key_and_unlike_under_another() -> None:
    # Prepare: two workers with the same key (a restart), one with another
    same, other = (WorkerMetrics("server", CollectorRegistry(), version="1") for _ in range(2))
    first = WorkerMetrics("server", CollectorRegistry(), version="1")
    for metrics, secret in ((first, SECRET), (same, SECRET), (other, b"x" * 32)):
        metrics.hash_names(secret)
    # Assert
    label = first.names("bank:run-1")
    assert label.startswith("h-") and len(label) == 14
    assert same.names("bank:run-1") == label != other.names("bank:run-1")
    assert first.names("bank:run-2") != label


async def test_init_writes_a_metrics_token_that_the_server_asks_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a deployment from `sl-pipeline init --ops`
    folder = tmp_path / "d"
    assert await asyncio.to_thread(main, ["init", str(folder), "--ops", "--clients", "1"]) == 0
    token_file = folder / "keys" / "metrics.token"
    server = ServerWorker(load(ServerConfig, folder / "server.toml"), folder)
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(stop))
    try:
        base = f"http://{server.cfg.ops.listen}"
        url = f"{base}/metrics"
        # Execute: once it is ready, scrape without and with the token init wrote
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not await check_health(base, 1.0):
            assert asyncio.get_running_loop().time() < deadline, "the server never started"
            await asyncio.sleep(0.05)
        refused = await asyncio.to_thread(_get, url)
        scraped = await asyncio.to_thread(_get, url, token_file.read_text().strip())
    finally:
        stop.set()
        await asyncio.wait_for(serving, TIMEOUT_S)
    # Assert: the token file is its owner's alone, named by the server's config
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert server.cfg.ops.metrics_token == "keys/metrics.token"
    assert refused[0] == 401 and scraped[0] == 200


async def test_init_puts_the_relays_and_each_clients_metrics_behind_the_same_token(
    tmp_path: Path,
) -> None:
    """A client's /metrics shows its training (before: open to whoever reached the port);
    one machine has one Prometheus, so every worker asks for the one token it sends."""
    # Prepare: a multihop deployment from `sl-pipeline init --ops`; the finished client
    # waits (60 s at most) for a scrape that carries its finish
    folder = tmp_path / "d"
    argv = ["init", str(folder), "--ops", "--topology", "multihop", "--clients", "1"]
    argv += ["--dataset", "breast_cancer", "--epochs", "1"]
    assert await asyncio.to_thread(main, argv) == 0
    files = {name: folder / f"{name}.toml" for name in ("server", "relay-1", "client-1")}
    configs = {name: tomllib.loads(path.read_text())["ops"] for name, path in files.items()}
    url = {name: f"{local_url(ops['listen'])}/metrics" for name, ops in configs.items()}
    token = metrics_token(folder)  # what the deployment's Prometheus sends every target
    run = asyncio.ensure_future(run_deployment(files, "ops.linger_s=60"))
    # Execute: once the client listens (the relay before it), scrape each without the
    # token, then with it; the client until a scrape shows its finish
    await asyncio.wait_for(listening(url["client-1"], run), 60)
    refused = {name: await scrape(url[name]) for name in ("relay-1", "client-1")}
    relay = await scrape(url["relay-1"], token)
    body, running = await scrape_until_finished(url["client-1"], token, run)
    await asyncio.wait_for(run, 30)  # that scrape ended its wait
    # Assert: each config names the one file; a one-line 401 without it, the figures with it
    assert {ops["metrics_token"] for ops in configs.values()} == {"keys/metrics.token"}
    for status, text in refused.values():
        assert status == 401 and text.count("\n") == 1 and "metrics_token" in text
    assert relay[0] == 200 and 'worker="relay"' in relay[1]
    assert running and 'worker="client"' in body


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ('ops.label_names="sha256"', "ops.label_names = 'sha256' is not allowed"),
        ('ops.metrics_token="keys/nothing.token"', "ops.metrics_token"),
        # Prometheus, which holds the metrics token, must not hold the run API's
        ('ops.metrics_token="keys/admin.token"', "holds the token of ops.admin_token"),
    ],
)
def test_a_bad_ops_setting_is_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:
    assert main(["init", str(tmp_path / "d"), "--ops"]) == 0
    capsys.readouterr()
    argv = ["server", "--config", str(tmp_path / "d" / "server.toml"), "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err, err


def test_hashed_names_need_a_key_to_hash_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "d"), "--ops", "--insecure"]) == 0
    capsys.readouterr()
    server = str(tmp_path / "d" / "server.toml")
    assert main(["server", "--config", server, "--set", 'ops.label_names="hashed"']) == 2
    err = capsys.readouterr().err
    assert 'ops.label_names = "hashed"' in err and "--insecure" in err, err


@pytest.mark.prometheus
@pytest.mark.timeout(90)
async def test_prometheus_scrapes_with_its_credentials_file_and_not_without(
    tmp_path: Path, ops: OpsServer
) -> None:
    # Prepare: the token in a file, as init and provision write it; one job sends it
    (tmp_path / "metrics.token").write_text(TOKEN + "\n")
    target = f"static_configs: [{{targets: ['127.0.0.1:{ops.port}']}}]"
    config = (
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: with, authorization: {{credentials_file: metrics.token}}, {target}}}\n"
        f"  - {{job_name: without, {target}}}\n"
    )
    process, url = await asyncio.to_thread(start_prometheus, config, tmp_path)
    try:
        # Execute: wait for both jobs' scrapes
        up = await asyncio.to_thread(query_until, url, "up", 30.0, lambda result: len(result) == 2)
        steps = await asyncio.to_thread(query_until, url, "sl_run_steps", 30.0)
    finally:
        await asyncio.to_thread(stop_prometheus, process)
    # Assert
    assert {r["metric"]["job"]: r["value"][1] for r in up} == {"with": "1", "without": "0"}
    assert steps[0]["metric"]["run"] == ops.metrics.names("hospital:trial")
