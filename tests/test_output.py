"""Operator-grade output: no progress bar off a terminal, a client summary that says where
the model is, and a server that logs each client's epochs and a summary of each run."""

from __future__ import annotations

import io
import logging

import pytest

from workers.cli import main
from workers.ops.logs import configure_logging
from workers.tools.inprocess import run_deployment

from .threadserver import ThreadServer


def test_client_off_a_terminal_logs_lines_and_summarises(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=2)
    with ThreadServer(files["server"]):
        code = main(["client", "--config", str(files["client-1"])])
        configure_logging("text", "INFO", stream=io.StringIO())  # the capture ends here
    out, err = capsys.readouterr()
    assert code == 0
    assert "\r" not in err  # stderr is no terminal here: no progress bar in the log
    assert "epoch 1: train loss" in err and "epoch 2: train loss" in err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("trained ") and "in run run-1" in summary
    assert "(best: epoch " in summary and "state/client-1.pt" in summary


async def test_server_logs_epochs_and_a_run_summary(
    deployment, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=2)
    with caplog.at_level(logging.INFO, logger="sl_pipeline.server"):
        run = await run_deployment(files)
    steps = run.summaries[0]["steps"]
    text = caplog.text
    assert "run run-1: client-1 is in epoch 1" in text
    assert "run run-1: client-1 is in epoch 2" in text
    assert f"run run-1 finished: {steps} steps by client-1 in" in text
    assert "runs/run-1/server.pt" in text


async def test_a_party_without_labels_names_no_best_epoch(deployment) -> None:  # type: ignore[no-untyped-def]
    """A vertical feature party knows neither accuracy nor loss (NaN): no epoch is "best"."""
    files = deployment(topology="vertical", clients=2, dataset="breast_cancer", epochs=2)
    run = await run_deployment(files)
    assert [s["test_accuracy"] for s in run.summaries] == [None, None]
    assert [s["best_epoch"] for s in run.summaries] == [None, None]
