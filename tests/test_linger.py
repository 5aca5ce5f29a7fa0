"""A finished client keeps serving its final metrics until one scrape after its finish, so a
run shorter than the scrape interval still leaves its figures in Prometheus
(``[ops] linger_s`` bounds the wait)."""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from pathlib import Path

import pytest

from tests.scrape import metrics_token, scrape_until_finished
from workers.client.worker import BYE_LINGER_MS
from workers.ops.http import local_url
from workers.tools.inprocess import run_deployment

LINGER = "ops.linger_s=60"  # far above what the tests wait: only the scrape can end it


def _metrics_url(files: dict[str, Path]) -> str:
    listen = tomllib.loads(files["client-1"].read_text())["ops"]["listen"]
    return f"{local_url(listen)}/metrics"


async def test_a_finished_client_serves_its_final_metrics_until_scraped(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a client with an ops port and a long linger
    files = deployment(dataset="breast_cancer", clients=1, ops=True)
    # Execute: train; scrape until a scrape shows the finish
    run = asyncio.create_task(run_deployment(files, LINGER))
    token = metrics_token(files["server"].parent)  # what the operator's Prometheus sends
    body, still_running = await scrape_until_finished(_metrics_url(files), token, run)
    result = await asyncio.wait_for(run, 15)  # that scrape ended the wait, not the 60 s
    # Assert: the client waited for that scrape, which carried its final accuracy
    assert still_running
    accuracy = result.summaries[0]["test_accuracy"]
    line = next(x for x in body.splitlines() if x.startswith("sl_test_accuracy_ratio "))
    assert float(line.split()[1]) == pytest.approx(accuracy)


async def test_the_wait_is_bounded_when_nobody_scrapes(
    deployment, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", clients=1, ops=True)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="sl_pipeline.client"):
        result = await asyncio.wait_for(run_deployment(files, "ops.linger_s=4"), 60)
    elapsed = time.monotonic() - started
    assert result.summaries[0]["steps"] > 0
    assert "no scrape within ops.linger_s = 4s; exiting" in caplog.text
    # the summary's wall time is the training's, without the 4 s spent waiting for a scrape
    # after it, however long a loaded host makes the training (6.9 s at load 5 once; quiet:
    # 0.92 s of 5.00 s, so a summary counting the wait would read 8.92 here); 0.05 s for
    # the summary's rounding
    assert result.summaries[0]["wall_seconds"] + 4 <= elapsed + 0.05, (result.summaries, elapsed)
    assert result.clients[0].metrics.registry.get_sample_value("sl_finished") == 1


async def test_a_closing_client_lets_its_last_message_leave() -> None:
    # A client's bye is its last message: closed with linger 0 right after the send, ZeroMQ
    # may drop it, and the server then holds the name until the session times out
    # (a restart is refused with name_in_use).
    import zmq
    import zmq.asyncio

    from sl_pipeline.transport import DealerConnection

    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        conn = DealerConnection(ctx, f"tcp://127.0.0.1:{port}")
        conn.sock.connect(f"tcp://127.0.0.1:{port}")
        await conn.sock.send(b"b" * (512 * 1024))  # a last message, as large as a chunk
        conn.close(linger_ms=BYE_LINGER_MS)
        assert await router.poll(5000), "the last message was dropped at close"
        _, body = await router.recv_multipart()
        assert len(body) == 512 * 1024
    finally:
        router.close(linger=0)
        ctx.term()
