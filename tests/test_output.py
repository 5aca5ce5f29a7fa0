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


def test_a_quieted_logger_is_quiet_only_on_the_commands_own_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the handler tune and audit install, quieting the in-process server's service
    # log; an output it writes to, and pytest's capture beside it
    out = io.StringIO()
    service = logging.getLogger("sl_pipeline.service")
    level_before = service.level
    configure_logging("text", "WARNING", "audit", stream=out, quiet=("sl_pipeline.service",))
    try:
        caplog.set_level(logging.WARNING)
        # Execute
        service.warning("rejected message from client-1 (oversized)")
        service.critical("the server stopped")
        logging.getLogger("sl_pipeline.client").warning("a client warning")
    finally:
        configure_logging("text", "INFO", stream=io.StringIO())  # the capture ends here
    # Assert: the command's output drops the service's warning, not its critical line nor
    # other loggers'; the logger itself is untouched, so pytest's capture (and any later
    # handler in the same process) still sees the warning (before: its level was set to
    # CRITICAL, and later tests' caplog read nothing from it)
    assert "oversized" not in out.getvalue()
    assert "the server stopped" in out.getvalue() and "a client warning" in out.getvalue()
    assert service.level == level_before
    assert "oversized" in caplog.text
