"""``server.save`` (the newest run's model, copied out of its run folder) under the ended
runs' retention: it goes with the run whose model it holds, and only then. A real server and
client over loopback, on `sl-pipeline init`'s config (``save = "state/server.pt"``)."""

from __future__ import annotations

import json
import logging

import pytest

from workers.server import retiring
from workers.tools.inprocess import wait_until

from .test_run_lifecycle import _client, _serving

DATA = dict(clients=1, dataset="breast_cancer", epochs=1, ops=True)  # 15 steps a run


async def test_the_saved_model_goes_with_its_run_when_retention_removes_it(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: run-1's folder went after server.keep_ended_for_s, and its model stayed on
    in server.save for as long as no other run ended (kept past the promise, and loaded by
    the next start)."""
    # Prepare: ended runs kept 0.5 s; the server looks at every tick
    files = deployment(**DATA)
    saved = files["server"].parent / "state" / "server.pt"
    monkeypatch.setattr(retiring, "RETIRE_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="sl_pipeline.server")
    async with _serving(files, "server.keep_ended_for_s=0.5") as server:
        # Execute: one run, then nothing
        first = await _client(files, "client-1")
        await wait_until(lambda: "run-1" not in server.book.runs, timeout_s=30)
    # Assert: its folder and server.save went, each logged
    assert first["run"] == "run-1" and not saved.exists()
    assert f"removed {saved} (server.save), run run-1's model, with the run" in caplog.text


async def test_the_saved_model_of_a_kept_run_stays(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a group keeps its newest ended run only
    files = deployment(**DATA)
    saved = files["server"].parent / "state" / "server.pt"
    async with _serving(files, "server.keep_ended_runs=1") as server:
        # Execute: two runs; run-1 goes at run-2's end
        await _client(files, "client-1")
        await _client(files, "client-1")
        kept = sorted(server.book.runs)
    # Assert: server.save holds run-2's model, as its folder does, and stays
    run2 = files["server"].parent / "state" / "runs" / "run-2" / "server.pt"
    assert kept == ["run-2"] and saved.read_bytes() == run2.read_bytes()
    state = json.loads((files["server"].parent / "state" / "runs" / ".removed.json").read_text())
    assert state["saved"]["id"] == "run-2"


async def test_a_saved_model_the_server_did_not_write_is_never_removed(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator's server.save (a model to start from) is no run's: kept at start, where
    runs older than the policy go."""
    # Prepare: run-1 trained and ended; its model put back as server.save by the operator
    # after the server forgot which run it copied (an older runs folder, say)
    files = deployment(**DATA)
    saved = files["server"].parent / "state" / "server.pt"
    monkeypatch.setattr(retiring, "RETIRE_EVERY_S", 0.0)
    async with _serving(files):
        await _client(files, "client-1")
    model = saved.read_bytes()
    removed = files["server"].parent / "state" / "runs" / ".removed.json"
    removed.unlink()
    # Execute: a server that keeps ended runs 0.5 s starts; run-1 goes
    async with _serving(files, "server.keep_ended_for_s=0.5") as server:
        await wait_until(lambda: "run-1" not in server.book.runs, timeout_s=30)
    # Assert: server.save stays as it was
    assert saved.read_bytes() == model
