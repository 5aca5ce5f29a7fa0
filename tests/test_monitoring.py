"""What a worker's own /metrics and /status say after a short run: the defects an operator
found (0-based epochs, uncounted client handshakes, a /status step that disagreed with
sl_step, `_created` series, a build-info label clashing with the scrape config's)."""

from __future__ import annotations

from workers.tools.inprocess import run_deployment


async def test_metrics_and_status_agree_after_a_run(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=2)
    run = await run_deployment(files)
    server, (client,) = run.server, run.clients
    served, own = server.metrics.render().decode(), client.metrics.render().decode()
    assert "_created" not in served and "_created" not in own
    assert "sl_build_info{version=" in own and 'worker="client"' in own and "role=" not in own
    assert "sl_epoch 2.0" in own and "sl_epoch 2.0" in served  # 1-based, as the logs say
    assert 'sl_handshakes_total{result="ok"} 1.0' in own  # the client counts its own
    steps = run.summaries[0]["steps"]
    assert client.status()["step"] == steps and f"sl_step {float(steps)}" in own
    assert f'sl_client_steps{{client="client-1"}} {float(steps)}' in served
    assert 'sl_client_finished{client="client-1"} 1.0' in served
    assert 'sl_client_connected{client="client-1"} 0.0' in served
    assert 'sl_run_active{run="run-1"} 0.0' in served
