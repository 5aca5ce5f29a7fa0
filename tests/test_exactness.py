"""Split training over the real encrypted pipeline equals the whole model trained in one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sl_pipeline.config import ClientConfig
from sl_pipeline.data import batch_order, load_party_data
from sl_pipeline.models import build_segments, make_optimizer
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment

from .conftest import load_client, load_server


def central_training(
    cfg_client: ClientConfig, base: Path, device: str = "cpu"
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The reference: the same network, seed and batches, trained in one process."""
    data = load_party_data(cfg_client.data, base, cfg_client.model.classes)
    bottom, top = (part.to(device) for part in build_segments(cfg_client.model, "vanilla"))
    x, y = data.train.x.to(device), data.train.y.to(device)
    t = cfg_client.train
    opt_b = make_optimizer(list(bottom.parameters()), t.optimizer, t.lr, t.momentum)
    opt_t = make_optimizer(list(top.parameters()), t.optimizer, t.lr, t.momentum)
    for epoch in range(t.epochs):
        for idx in batch_order(len(data.train), t.batch_size, t.seed, epoch):
            opt_b.zero_grad()
            opt_t.zero_grad()
            loss = F.cross_entropy(top(bottom(x[idx])), y[idx])
            loss.backward()
            opt_b.step()
            opt_t.step()
    return bottom, top


async def split_training(server_cfg, client_cfg, base: Path, server_out: dict | None = None):  # type: ignore[no-untyped-def]
    server = ServerWorker(server_cfg, base)
    client = ClientWorker(client_cfg, base, progress=False)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    try:
        summary = await asyncio.wait_for(client.run(), 120)
    finally:
        stop.set()
        server_summary = await asyncio.wait_for(task, 10)
    if server_out is not None:
        server_out.update(server_summary)
    return client.bottom, server.engine.model, summary


NO_CHECKPOINT = 'checkpoint.dir=""'


@pytest.mark.parametrize(
    ("dataset", "server_overrides", "replies_first"),
    [
        # init checkpoints the server every step, which defers no update: reply-first shows
        # only without a checkpoint due
        ("digits", (NO_CHECKPOINT,), True),
        ("breast_cancer", (NO_CHECKPOINT,), True),
        ("digits", ("server.reply_first=false",), False),
        # A checkpoint due with every step must hold the update before the reply leaves.
        ("digits", ("checkpoint.dir=ckpt-server",), False),
    ],
)
async def test_split_weights_equal_central_weights(  # type: ignore[no-untyped-def]
    deployment, dataset: str, server_overrides: tuple[str, ...], replies_first: bool
) -> None:
    # Prepare
    files = deployment(dataset=dataset, epochs=2)
    base = files["server"].parent
    server_cfg = load_server(files["server"], *server_overrides)
    client_cfg = load_client(files["client-1"])
    server_summary: dict = {}
    # Execute
    bottom, top, summary = await split_training(server_cfg, client_cfg, base, server_summary)
    ref_bottom, ref_top = central_training(client_cfg, base)
    # Assert
    assert summary["steps"] > 0
    # Reply-first (the default) moves when the server's update happens, never what it is.
    assert (server_summary["replied_first"] > 0) is replies_first
    for split_part, ref_part in ((bottom, ref_bottom), (top, ref_top)):
        for (name, p), (_, q) in zip(
            split_part.state_dict().items(), ref_part.state_dict().items(), strict=True
        ):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topology": "ushaped"},
        {"topology": "vertical", "dataset": "breast_cancer", "clients": 2},
        {"topology": "vertical", "dataset": "breast_cancer", "clients": 2, "label_client": True},
    ],
    ids=["ushaped", "vertical", "vertical-label-client"],
)
async def test_reply_first_moves_the_update_not_its_value(deployment, kwargs) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two identical deployments (same data, seed and initial weights)
    runs = {}
    # Execute
    for flag in ("true", "false"):
        files = deployment(epochs=1, **kwargs)
        overrides = (f"server.reply_first={flag}", NO_CHECKPOINT)
        runs[flag] = await run_deployment(files, server_overrides=overrides)
    # Assert
    first, plain = runs["true"].server, runs["false"].server
    assert first.engine.deferred_updates > 0
    assert plain.engine.deferred_updates == 0
    assert first.steps_applied == plain.steps_applied > 0
    for (name, p), (_, q) in zip(
        first.engine.model.state_dict().items(),
        plain.engine.model.state_dict().items(),
        strict=True,
    ):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
