"""A vertical run whose rows are still being aligned (PSI) when one party is late, on a
server whose places are full (``server.max_runs``): past ``server.empty_run_s`` the run
has applied no step, and may give its place up to a new run. The late party still joins,
or is told in one line why not; no traceback, and no run left behind."""

from __future__ import annotations

import asyncio
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zmq.asyncio

from sl_pipeline.config import ClientConfig, load
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.client import align
from workers.client.link import make_handshake
from workers.client.worker import ClientWorker
from workers.tools.inprocess import wait_until
from workers.tools.localdeploy import to_toml

from .datafiles import party_csv
from .test_data_vertical import A_COLUMNS, B_COLUMNS, _people, _shuffled, _use_data
from .test_run_lifecycle import _serving


def _parties(deployment, tmp_path: Path, clients: int = 2):  # type: ignore[no-untyped-def]
    """A vertical deployment whose two parties align their rows by PSI (and, with
    ``clients = 3``, one more admitted client, which is no party of theirs)."""
    shared, only_a, only_b = _people()
    files = deployment(
        topology="vertical", clients=clients, dataset="breast_cancer", label_client=True, epochs=1
    )
    for name, path in files.items():  # two parties of 15 columns each align by PSI
        cfg = tomllib.loads(path.read_text())
        cfg["model"]["in_shape"] = [len(A_COLUMNS)]
        if name in ("client-1", "client-2"):
            cfg["client"]["group"] = ["client-1", "client-2"]
        path.write_text(to_toml(cfg))
    a = party_csv(tmp_path / "a.csv", _shuffled(np.r_[shared, only_a], 2), A_COLUMNS, True)
    b = party_csv(tmp_path / "b.csv", _shuffled(np.r_[shared, only_b], 3), B_COLUMNS)
    _use_data(files["client-1"], path=str(a), id="id", label="diagnosis")
    _use_data(files["client-2"], path=str(b), id="id")
    return files


def _party(files, name: str, *sets: str) -> ClientWorker:  # type: ignore[no-untyped-def]
    cfg = load(ClientConfig, files[name], list(sets))
    return ClientWorker(cfg, files["server"].parent, progress=False)


async def test_a_party_late_past_empty_run_s_on_a_full_server_still_joins(
    deployment, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: one place (server.max_runs = 1), and runs that applied no step expire after
    # 0.3 s; the first party starts run-1 with its PSI post and waits for the second
    files = _parties(deployment, tmp_path)
    sets = ("server.max_runs=1", "server.empty_run_s=0.3", "server.run_clients=2")
    async with _serving(files, *sets) as server:
        first = _party(files, "client-1")
        early = asyncio.create_task(first.run())
        await wait_until(lambda: "run-1" in server.book.runs or early.done())
        run = server.book.runs["run-1"]
        await wait_until(lambda: time.monotonic() - run.opened > 0.6 or early.done())
        # Execute: the second party joins past empty_run_s, the run still aligning
        second = _party(files, "client-2")
        summaries = await asyncio.wait_for(asyncio.gather(early, second.run()), 120)
        await wait_until(lambda: not run.active)  # both byes in
    # Assert: both aligned and trained in run-1, which finished: the one run there is
    assert [s["run"] for s in summaries] == ["run-1", "run-1"]
    assert summaries[0]["aligned_rows"] == summaries[1]["aligned_rows"] > 0
    assert summaries[0]["steps"] == summaries[1]["steps"] == run.steps > 0
    assert [(r.id, r.state) for r in server.book.runs.values()] == [("run-1", "finished")]
    assert summaries[0]["retries"] == summaries[1]["retries"] == 0


async def ask_for_a_run_of_its_own(files, run: str) -> Any:  # type: ignore[no-untyped-def]
    """client-3 says hello naming ``run`` and posts a PSI round there (its partner never
    comes): a new run that needs a place. The connection, for the caller to close."""
    cfg = load(ClientConfig, files["client-3"], [])
    handshake = make_handshake(cfg, files["server"].parent, "vertical")
    handshake.hello = {**handshake.hello, "run": run}
    ctx = zmq.asyncio.Context()
    conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
    await conn.handshake(handshake, 10.0)
    sealed = torch.zeros(64, dtype=torch.uint8)
    post = Message(
        Kind.WEIGHTS, client="client-3", meta={"op": "psi", "round": 0}, tensors={"sealed": sealed}
    )
    await conn.send(post)
    return ctx, conn


async def test_an_aligning_run_that_gave_its_place_up_leaves_its_parties_a_run_to_train_in(
    deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: one place; client-1 starts run-1 with its PSI post (waiting 1 s at a time);
    # past empty_run_s another client asks for a run of its own, and run-1 gives way
    monkeypatch.setattr(align, "PSI_WAIT_S", 1.0)
    files = _parties(deployment, tmp_path, clients=3)
    sets = (
        "server.parties=2",
        "server.max_runs=1",
        "server.empty_run_s=0.3",
        "server.run_clients=2",
        "server.takeover_after_s=0.3",
    )
    async with _serving(files, *sets) as server:
        first = _party(files, "client-1")
        early = asyncio.create_task(first.run())
        await wait_until(lambda: "run-1" in server.book.runs or early.done())
        opened = server.book.runs["run-1"].opened
        await wait_until(lambda: time.monotonic() - opened > 0.6 or early.done())
        ctx, conn = await ask_for_a_run_of_its_own(files, "other")
        try:
            await wait_until(lambda: "run-1" not in server.book.runs)
            # Execute: the late party joins
            second = _party(files, "client-2")
            summaries = await asyncio.wait_for(asyncio.gather(early, second.run()), 120)
        finally:
            conn.close()
            ctx.destroy(linger=0)
        await wait_until(lambda: not server.book.runs["run-1"].active)  # both byes in
    # Assert: run-1 and then client-3's run gave their places up (neither applied a step);
    # the late party started a run, the first party joined it after its PSI wait, and both
    # trained it to its end: the one run left; no internal error on the way
    metrics = server.metrics.registry
    assert metrics.get_sample_value("sl_bound_hits_total", {"table": "empty_runs"}) == 2
    assert metrics.get_sample_value("sl_rejected_messages_total", {"reason": "internal"}) == 0
    assert [s["run"] for s in summaries] == ["run-1", "run-1"] and first.link.retries >= 1
    assert summaries[0]["steps"] == summaries[1]["steps"] == server.book.runs["run-1"].steps > 0
    assert [(r.id, r.state) for r in server.book.runs.values()] == [("run-1", "finished")]
