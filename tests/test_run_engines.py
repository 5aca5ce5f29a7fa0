"""Ended runs' models in a long-lived server's memory: the KEEP_ENGINES newest, however
often clients predict on older runs (each of those reloads from its file and then leaves).
Before, a prediction naming each ended run loaded its model and kept it: 4 -> 8 engines over
8 ended runs (red team), and a group may keep 500 ended runs."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from workers.client.predict import Inputs, _predict
from workers.client.worker import ClientWorker
from workers.server.runs import KEEP_ENGINES
from workers.server.worker import ServerWorker

from .conftest import load_client, load_server
from .test_runs import _serve

RUNS = KEEP_ENGINES + 3


async def test_predicting_on_every_old_run_keeps_few_models_in_memory(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a run ends as its one client finishes; RUNS of them, one after another
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    sets = ("server.run_clients=1", "server.run_starts_per_min=0")
    server = ServerWorker(load_server(files["server"], *sets), base)
    stop, task = await _serve(server)
    held = []
    try:
        for _ in range(RUNS):
            cfg = load_client(files["client-1"])
            await asyncio.wait_for(ClientWorker(cfg, base, progress=False).run(), 120)
        # Execute: a prediction naming each run, the oldest first
        for k in range(1, RUNS + 1):
            cfg = load_client(files["client-1"], f"client.run=run-{k}")
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0))
            worker = ClientWorker(cfg, base, progress=False)
            worker.runner.load(base / "state" / "client-1.pt")
            asked = _predict(worker, Inputs(torch.zeros(4, 30)), False)
            logits, _ = await asyncio.wait_for(asked, 60)
            assert logits.shape[0] == 4  # answered from that run's model
            held.append(sum(r.engine is not None for r in server.book.runs.values()))
    finally:
        stop.set()
        await task
    # Assert: never more than the newest few and the one just asked
    assert len(server.book.runs) == RUNS
    assert max(held) <= KEEP_ENGINES + 1, held
