"""Split training over the real encrypted pipeline equals the whole model trained in one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sl_pipeline.data import batch_order, load_party_data
from sl_pipeline.models import build_segments, make_optimizer
from workers.client import ClientWorker
from workers.server import ServerWorker

from .conftest import load_client, load_server


def central_training(cfg_client, base: Path) -> tuple[torch.nn.Module, torch.nn.Module]:  # type: ignore[no-untyped-def]
    """The reference: the same network, seed and batches, trained in one process."""
    data = load_party_data(cfg_client.data, base, cfg_client.model.classes)
    bottom, top = build_segments(cfg_client.model, "vanilla")
    t = cfg_client.train
    opt_b = make_optimizer(list(bottom.parameters()), t.optimizer, t.lr, t.momentum)
    opt_t = make_optimizer(list(top.parameters()), t.optimizer, t.lr, t.momentum)
    for epoch in range(t.epochs):
        for idx in batch_order(len(data.train), t.batch_size, t.seed, epoch):
            opt_b.zero_grad()
            opt_t.zero_grad()
            loss = F.cross_entropy(top(bottom(data.train.x[idx])), data.train.y[idx])
            loss.backward()
            opt_b.step()
            opt_t.step()
    return bottom, top


async def split_training(server_cfg, client_cfg, base: Path):  # type: ignore[no-untyped-def]
    server = ServerWorker(server_cfg, base)
    client = ClientWorker(client_cfg, base, progress=False)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    try:
        summary = await asyncio.wait_for(client.run(), 120)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return client.bottom, server.engine.model, summary


@pytest.mark.parametrize("dataset", ["digits", "breast_cancer"])
async def test_split_weights_equal_central_weights(deployment, dataset: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    files = deployment(dataset=dataset, epochs=2)
    base = files["server"].parent
    server_cfg = load_server(files["server"])
    client_cfg = load_client(files["client-1"])
    # Execute
    bottom, top, summary = await split_training(server_cfg, client_cfg, base)
    ref_bottom, ref_top = central_training(client_cfg, base)
    # Assert
    assert summary["steps"] > 0
    for split_part, ref_part in ((bottom, ref_bottom), (top, ref_top)):
        for (name, p), (_, q) in zip(
            split_part.state_dict().items(), ref_part.state_dict().items(), strict=True
        ):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name
