"""`sl-pipeline predict`: inference with a trained split model; only activations leave."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq.asyncio

from sl_pipeline.config import ClientConfig, DataConfig, resolve_path
from sl_pipeline.data import load_arrays
from sl_pipeline.errors import ConfigError
from sl_pipeline.messages import Kind

from .client import ClientWorker

BATCH = 256


def read_inputs(cfg: ClientConfig, path: Path) -> torch.Tensor:
    """Features from a .csv (header row, no label column) or .npz (``data.features``)."""
    data = DataConfig(
        path=str(path.resolve()), features=cfg.data.features, feature_slice=cfg.data.feature_slice
    )
    x, _, shape = load_arrays(data, Path("."))
    expected = list(cfg.model.in_shape)
    if cfg.model.builtin and expected and int(np.prod(shape)) == int(np.prod(expected)):
        x = x.reshape(-1, *expected)
    return torch.from_numpy(np.ascontiguousarray(x))


async def _predict(worker: ClientWorker, x: torch.Tensor) -> torch.Tensor:
    worker.ctx = zmq.asyncio.Context()
    try:
        await worker.connect()
        outs = []
        for step, start in enumerate(range(0, len(x), BATCH)):
            batch = x[start : start + BATCH]
            ids = torch.arange(start, start + len(batch))
            outs.append(await worker.runner.predict(batch, step, ids, Kind.PREDICT))
        assert worker.conn is not None
        await worker.conn.send(worker.message(Kind.BYE))
        return torch.cat(outs)
    finally:
        if worker.conn is not None:
            worker.conn.close()
        worker.ctx.destroy(linger=0)


def run_predict(cfg: ClientConfig, base: Path, input_path: Path) -> dict[str, Any]:
    if not cfg.client.save:
        raise ConfigError("client.save is not set: there is no trained segment to predict with")
    saved = resolve_path(base, cfg.client.save, "client.save", must_exist=False)
    if not saved.exists():
        raise ConfigError(
            f"client.save = {cfg.client.save!r}: no trained segment at {saved}; train first"
        )
    if not input_path.exists():
        raise ConfigError(f"--input {str(input_path)!r}: no such file")
    # Vertical: every feature party runs predict at the same time on its own columns of the
    # same rows (row order aligns them); the server fuses the parts and answers everyone.
    x = read_inputs(cfg, input_path)
    worker = ClientWorker(replace(cfg, train=replace(cfg.train, epochs=0)), base, progress=False)
    worker.runner.load(saved)
    logits = asyncio.run(_predict(worker, x))
    return {"predictions": logits.argmax(1).tolist(), "logits": logits.tolist(), "count": len(x)}
