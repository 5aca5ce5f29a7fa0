"""Red team of the ops port's tokens (2026-12-01): what a stranger who reaches a worker's ops
port learns without them, and the operator mistakes a worker refuses. Through
``workers.cli.main`` and real loopback HTTP against workers started from their configs."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

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
