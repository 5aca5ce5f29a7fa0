"""A vertical run whose rows are still being aligned (PSI) when one party is late, on a
server whose places are full (``server.max_runs``): past ``server.empty_run_s`` the run
has applied no step, and may give its place up to a new run. The late party still joins,
or is told in one line why not; no traceback, and no run left behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from sl_pipeline.config import ClientConfig, load
from workers.client.worker import ClientWorker
from workers.tools.inprocess import wait_until

from .datafiles import party_csv
from .test_data_vertical import A_COLUMNS, B_COLUMNS, _people, _shuffled, _use_data
from .test_run_lifecycle import _serving


def _parties(deployment, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A vertical deployment whose two parties align their rows by PSI."""
    shared, only_a, only_b = _people()
    files = deployment(
        topology="vertical", clients=2, dataset="breast_cancer", label_client=True, epochs=1
    )
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
