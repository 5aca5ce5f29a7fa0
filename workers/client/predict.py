"""`sl-pipeline predict`: inference with a trained split model; only activations leave.

New rows are encoded exactly as the training rows were: a table with the encoding saved
beside the segment (vocabularies, scaling, fill values), other inputs as plain numbers or
images. How an unseen category or a gap is handled (``data.unknown``, ``data.missing``) is
the config's at predict, as the refusals' advice says, not the one saved at training.
Vertical parties with ids align the rows by PSI first, the same way as for training, so each
party only needs its own file of its own columns.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq.asyncio

from sl_pipeline import encoding, images
from sl_pipeline.config import ClientConfig, DataConfig, resolve_path
from sl_pipeline.data import Scaling
from sl_pipeline.encoding import Encoding
from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.messages import Kind
from sl_pipeline.sources import from_npz
from sl_pipeline.tables import Table, read_table, with_ids
from workers.client.align import align_rows
from workers.client.steps import DATA_STATE
from workers.client.worker import BYE_LINGER_MS, ClientWorker
from workers.runtime import eventloop
from workers.runtime.savedmodel import load_weights

BATCH = 256


@dataclass(frozen=True)
class Inputs:
    x: torch.Tensor
    ids: list[str] | None = None


def saved_data(path: Path) -> tuple[Encoding | None, list[str] | None, Scaling | None]:
    """The encoding, label names and scaling saved with a trained segment (None: plain)."""
    state = load_weights(path, "client.save")
    if DATA_STATE not in state:
        return None, None, None
    raw = json.loads(state[DATA_STATE])
    enc = Encoding.from_dict(raw["encoding"]) if raw.get("encoding") else None
    scaling = Scaling(**raw["scaling"]) if raw.get("scaling") else None
    return enc, raw.get("label_names"), scaling


def read_inputs(
    cfg: ClientConfig, path: Path, enc: Encoding | None = None, scaling: Scaling | None = None
) -> Inputs:
    """Features of every row of ``path``: a table, an .npz, or a folder of image files."""
    ids = None
    if enc is not None and (path.is_dir() or path.suffix.lower() == ".npz"):
        raise ConfigError(
            f"--input {str(path)!r}: this segment was trained on a table, whose columns it "
            "encodes; give the new rows as a .csv or .parquet with the training file's columns"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in images.EXTENSIONS)
        if not files:
            raise ConfigError(f"--input {str(path)!r}: no image files in this folder")
        d = cfg.data
        x = images.decode_all(files, cfg.model.in_shape, d.resize, d.max_memory_mb)
        ids = [str(f.relative_to(path)) for f in files]
    elif path.suffix.lower() == ".npz":
        x, _ = from_npz(path, cfg.data.features, "")
    elif enc is None and path.suffix.lower() != ".parquet":
        x = _plain_csv(path)
    else:
        table = read_table(path, DataConfig(), "--input")
        column = enc.id if enc is not None else cfg.data.id
        if column and column in table.columns:
            table = with_ids(table, column)
            ids = table.ids
        x = encoding.transform(enc, table) if enc is not None else _numbers(table)
    if scaling is not None:  # as the training rows were (before any feature_slice)
        x = scaling.apply(x, f"--input {str(path)!r}")
    if cfg.data.feature_slice:
        a, z = cfg.data.feature_slice
        x = x.reshape(len(x), -1)[:, a:z]
    expected = list(cfg.model.in_shape)
    if expected and int(np.prod(x.shape[1:])) == int(np.prod(expected)):
        x = x.reshape(-1, *expected)
    elif expected and int(np.prod(expected)) > 0:
        raise ConfigError(
            f"--input {str(path)!r} gives {list(x.shape[1:])} features per row, but the model "
            f"was trained with model.in_shape = {expected}"
        )
    _check_finite(x, path, ids)
    return Inputs(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), ids)


def _check_finite(x: np.ndarray, path: Path, ids: list[str] | None) -> None:
    """NaN or inf in a row is refused here, naming the row, not by the server (its
    activations would be NaN: a peer error that names no row)."""
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        row = int(bad[0])
        name = f"id {ids[row]!r}" if ids else f"row {row + 1} of the data"
        raise ConfigError(
            f"--input {str(path)!r}: {name} holds NaN or infinite values ({len(bad)} such "
            "rows); fill them in or drop those rows"
        )


def _plain_csv(path: Path) -> np.ndarray:
    """Rows of plain numbers (a model trained without a saved encoding); a first row that is
    not all numbers is a header."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [(n, row) for n, row in enumerate(csv.reader(fh), 1) if row]
    except UnicodeDecodeError:
        raise ConfigError(f"--input {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    except (OSError, csv.Error) as exc:
        raise ConfigError(f"--input {str(path)!r} cannot be read as CSV: {exc}") from None
    if rows and not all(_is_number(v) for v in rows[0][1]):
        rows = rows[1:]
    if not rows:
        raise ConfigError(f"--input {str(path)!r} has no rows")
    width = len(rows[0][1])
    out = np.empty((len(rows), width), dtype=np.float32)
    for i, (line, row) in enumerate(rows):
        if len(row) != width or not all(_is_number(v) for v in row):
            raise ConfigError(
                f"{path}, line {line}: expected {width} numbers, got {row[:8]}; "
                "every row needs one number per feature"
            )
        out[i] = [float(v) for v in row]
    return out


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _numbers(table: Table) -> np.ndarray:
    """A table of plain numbers (a model trained without a saved encoding)."""
    out = np.empty((len(table), len(table.header)), dtype=np.float32)
    for col, name in enumerate(table.header):
        for row, value in enumerate(table.columns[name]):
            try:
                out[row, col] = float(value)
            except ValueError:
                raise ConfigError(f"{table.at(row, name)}: {value!r} is not a number") from None
    return out


async def _predict(worker: ClientWorker, inputs: Inputs, psi: bool) -> tuple[torch.Tensor, Inputs]:
    worker.ctx = zmq.asyncio.Context()
    try:
        await worker.connect()
        if psi:
            assert inputs.ids is not None and worker.psi_key is not None
            c = worker.cfg.client
            rows = await align_rows(inputs.ids, worker.psi_key, c, worker.request, worker.message)
            inputs = Inputs(inputs.x[rows], [inputs.ids[r] for r in rows])
        outs: list[torch.Tensor] = []
        for step, start in enumerate(range(0, len(inputs.x), BATCH)):
            batch = inputs.x[start : start + BATCH]
            ids = torch.arange(start, start + len(batch))
            out = await worker.runner.predict(batch, step, ids, Kind.PREDICT)
            width = outs[0].shape[1] if outs else max(1, out.shape[1])  # one score a class
            if out.shape[1] != width:
                raise ProtocolError(
                    f"the server's predictions for batch {step} have {out.shape[1]} scores a "
                    f"row, not {width}: it answered with another model, or a faulty one"
                )
            outs.append(out)
        assert worker.conn is not None
        await worker.conn.send(worker.message(Kind.BYE))
        return torch.cat(outs), inputs
    finally:
        if worker.conn is not None:
            worker.conn.close(BYE_LINGER_MS)  # the bye leaves: the name is free at once
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
    enc, names, scaling = saved_data(saved)
    if enc is not None:  # a policy, not a fitted value: the config in effect decides
        enc = replace(enc, unknown=cfg.data.unknown, missing=cfg.data.missing)
    inputs = read_inputs(cfg, input_path, enc, scaling)
    worker = ClientWorker(replace(cfg, train=replace(cfg.train, epochs=0)), base, progress=False)
    worker.runner.load(saved)
    # Vertical: every feature party runs predict at the same time on its own columns of the
    # same rows: aligned by PSI when they trained that way, else by row order.
    psi = worker.psi_key is not None
    if psi and inputs.ids is None:
        raise ConfigError(
            f"--input {str(input_path)!r} has no id column {enc.id if enc else cfg.data.id!r}; "
            "this party aligns its rows with the other party's by id"
        )
    logits, inputs = eventloop.run(_predict(worker, inputs, psi))
    predictions = logits.argmax(1).tolist()
    result: dict[str, Any] = {"predictions": predictions, "logits": logits.tolist()}
    result["count"] = len(predictions)
    if inputs.ids is not None:
        result["ids"] = inputs.ids
    if names:
        result["labels"] = [names[p] if p < len(names) else str(p) for p in predictions]
    return result
