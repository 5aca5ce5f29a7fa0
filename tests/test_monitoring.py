"""What a worker's own /metrics and /status say after a short run: the defects an operator
found (0-based epochs, uncounted client handshakes, a /status step that disagreed with
sl_step, `_created` series, a build-info label clashing with the scrape config's)."""

from __future__ import annotations

import asyncio
import re

from sklearn.datasets import load_breast_cancer

from workers.cli import main
from workers.server.worker import ServerWorker
from workers.tools.inprocess import build_deployment, run_deployment, wait_until


def _byes_in(server: ServerWorker) -> bool:
    """run-1 ended: every bye is in. A bye gets no reply, so a client may return before the
    server has it, and a stopped server never counts it (failed 1 run in 2-6 here)."""
    return not server.book.runs["run-1"].active


async def test_metrics_and_status_agree_after_a_run(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=2)
    run = await run_deployment(files, until=_byes_in)
    server, (client,) = run.server, run.clients
    served, own = server.metrics.render().decode(), client.metrics.render().decode()
    assert "_created" not in served and "_created" not in own
    assert "sl_build_info{version=" in own and 'worker="client"' in own and "role=" not in own
    assert "sl_epoch 2.0" in own and "sl_epoch 2.0" in served  # 1-based, as the logs say
    # the client counts its own (more than one where a loaded host had its hello retried)
    assert re.search(r'sl_handshakes_total\{result="ok"\} [1-9][0-9]*\.0', own), own
    steps = run.summaries[0]["steps"]
    assert client.status()["step"] == steps and f"sl_step {float(steps)}" in own
    assert f'sl_client_steps{{client="client-1"}} {float(steps)}' in served
    assert 'sl_client_finished{client="client-1"} 1.0' in served
    assert 'sl_client_connected{client="client-1"} 0.0' in served
    assert 'sl_run_active{run="run-1"} 0.0' in served


FINISHED = 'sl_client_finished{client="client-1"} 1.0'
BYES = 'sl_messages_total{direction="received",kind="bye"} '


async def test_a_predict_session_leaves_a_finished_client_finished(deployment, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 trained to the end of its run; the server stays up
    files = deployment(dataset="breast_cancer", epochs=1)
    run = build_deployment(files)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(run.server.serve(stop))
    try:
        await wait_until(run.server.ready)
        await run.clients[0].run()
        served = lambda: run.server.metrics.render().decode()  # noqa: E731
        await wait_until(lambda: FINISHED in served() and f"{BYES}1.0" in served())
        rows = tmp_path / "rows.csv"
        data = load_breast_cancer().data[:3]
        rows.write_text("".join(",".join(map(str, row)) + "\n" for row in data))
        # Execute: predict as client-1 (its hello says it only infers), as a user runs it
        argv = ["predict", "--config", str(files["client-1"]), "--input", str(rows), "--json"]
        assert await asyncio.to_thread(main, argv) == 0
        await wait_until(lambda: f"{BYES}2.0" in served())  # the predict session's bye
        # Assert: still finished, so SLClientLost (connected 0 and finished 0) stays quiet
        assert 'sl_client_connected{client="client-1"} 0.0' in served()
        assert FINISHED in served()
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)


async def test_a_relay_is_never_a_client_lost_mid_run(deployment) -> None:  # type: ignore[no-untyped-def]
    """A relay joins the server like a client but trains no run of its own: a finished
    series of 0 for it read as "training" on the dashboard for ever, and SLClientLost
    fired whenever the relay stopped (connected 0, finished 0). Its clients keep theirs."""
    files = deployment(topology="multihop", dataset="breast_cancer", epochs=1)
    run = await run_deployment(files, until=_byes_in)  # its bye came by the relay
    served = run.server.metrics.render().decode()
    assert 'sl_client_finished{client="relay-1/client-1"} 1.0' in served
    assert 'sl_client_connected{client="relay-1"}' in served  # it is seen joining
    assert 'sl_client_finished{client="relay-1"}' not in served


async def test_a_relays_client_is_watched_like_a_direct_one(deployment) -> None:  # type: ignore[no-untyped-def]
    """SLClientLost joins sl_client_connected and sl_client_finished on the client's name:
    a client behind a relay had only the second (the server never sees its hello), so no
    lost relayed client could ever fire it. Now its first step shows it connected, its bye
    or its relay's leaving shows it gone."""
    files = deployment(topology="multihop", dataset="breast_cancer", clients=2, epochs=1)
    # until both byes are in (they get no reply: a client may end before the server has it)
    run = await run_deployment(files, until=_byes_in)
    served = run.server.metrics.render().decode()
    for name in ("relay-1/client-1", "relay-1/client-2"):
        assert f'sl_client_finished{{client="{name}"}} 1.0' in served
        assert f'sl_client_connected{{client="{name}"}} 0.0' in served  # said bye
    series = run.server.clients
    series.started("relay-1/client-3", connected=True)  # a third one, still training
    assert series.connected.labels(client="relay-1/client-3")._value.get() == 1.0
    series.left("relay-1")  # its relay goes: it goes too
    assert series.connected.labels(client="relay-1/client-3")._value.get() == 0.0
