"""Data a party holds, split with a seed: built-in sets, NPZ arrays, tables, image folders.

Built-ins come from scikit-learn (no download): ``digits`` (1x8x8 images, 10 classes)
and ``breast_cancer`` (30 tabular features, 2 classes). A user's own rows are loaded and
checked by :mod:`sl_pipeline.sources`; here they are split (train/test, shards), tables are
encoded with statistics of the training rows only, and the result is checked against
``model.in_shape``. Every sample keeps its row position as its id so vertically partitioned
parties can align batches without sharing features (after a PSI, the position in the
agreed intersection).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import encoding
from .config import DataConfig
from .encoding import Encoding
from .errors import ConfigError
from .images import mapped_array
from .sources import Source, check_arrays, load_source


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor | None
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Scaling:
    """The mean and spread of this party's training rows (arrays: NPZ, breast_cancer), per
    feature, flattened: saved with the segment, so ``predict`` scales new rows the same way."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaling:
        flat = x.reshape(len(x), -1)  # float32, as the rows are: the same figures as ever
        return cls(flat.mean(axis=0).tolist(), (flat.std(axis=0) + 1e-6).tolist())

    def apply(self, x: np.ndarray, where: str) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != len(self.mean):
            raise ConfigError(
                f"{where} gives {flat.shape[1]} features per row, but the model was trained "
                f"on {len(self.mean)}; give rows with the training file's features"
            )
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return ((flat - mean) / std).astype(np.float32).reshape(x.shape)


@dataclass(frozen=True)
class PartyData:
    train: Split
    test: Split
    in_shape: list[int]
    classes: int
    encoding: Encoding | None = None  # a table's fitted encoding, saved with the segment
    label_names: list[str] | None = None  # text labels: the name of each class index
    scaling: Scaling | None = None  # arrays standardised with the training rows' statistics

    def saved_state(self) -> str | None:
        """How this party's rows were turned into inputs (JSON, beside its weights), so
        predict does the same to new rows; None where raw values went in unchanged."""
        if self.encoding is None and self.label_names is None and self.scaling is None:
            return None
        scaling = vars(self.scaling) if self.scaling is not None else None
        encoding = self.encoding.to_dict() if self.encoding is not None else None
        return json.dumps(
            {"encoding": encoding, "label_names": self.label_names, "scaling": scaling}
        )


def _slice_features(x: np.ndarray, bounds: list[int]) -> tuple[np.ndarray, list[int]]:
    if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1] <= x.reshape(len(x), -1).shape[1]:
        raise ConfigError(f"data.feature_slice = {bounds} must be [start, stop) within features")
    flat = x.reshape(len(x), -1)[:, bounds[0] : bounds[1]]
    return np.ascontiguousarray(flat), [bounds[1] - bounds[0]]


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation cut into train and test: the same on every party."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction = {test_fraction} must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


TASKS = {
    # Built-in multitask demo: several label sets derived from one data set.
    "digit": lambda y: y,
    "parity": lambda y: y % 2,
    "large": lambda y: (y >= 5).astype(np.int64),
}


def load_party_data(
    cfg: DataConfig, base: Path, classes: int | None = None, in_shape: Sequence[int] = ()
) -> PartyData:
    """Load, check, split and encode this party's rows (``classes``/``in_shape``: [model])."""
    return prepare(load_source(cfg, base, classes or 0, in_shape), cfg, classes, in_shape)


def load_arrays(cfg: DataConfig, base: Path) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """Every row's features (tables encoded with all rows), labels and per-sample shape."""
    src = load_source(cfg, base)
    if src.table is not None:
        enc = encoding.fit(src.table, cfg, range(len(src)), src.label_names)
        x, shape = encoding.transform(enc, src.table), [enc.width]
    else:
        assert src.x is not None
        x, shape = src.x, src.shape
    if cfg.feature_slice:
        x, shape = _slice_features(x, cfg.feature_slice)
    return x, src.y, shape


def prepare(
    src: Source, cfg: DataConfig, classes: int | None = None, in_shape: Sequence[int] = ()
) -> PartyData:
    """Split ``src`` with the seed, fit a table's encoding on the training rows, check shapes."""
    if cfg.task:  # a task's labels first: the model's classes are the task's, not the data's
        if cfg.task not in TASKS:
            raise ConfigError(f"data.task = {cfg.task!r} is unknown; choose one of {sorted(TASKS)}")
        if src.y is not None:
            src = replace(src, y=TASKS[cfg.task](src.y))
    where = f"data.path = {cfg.path!r}" if cfg.path else f"data.dataset = {cfg.dataset!r}"
    check_arrays(src, where, classes or 0)
    y = src.y
    train_idx, test_idx = split_indices(len(src), cfg.test_fraction, cfg.seed)
    if cfg.shards < 1 or not 0 <= cfg.shard < cfg.shards:
        raise ConfigError(f"data.shard = {cfg.shard} must be in [0, data.shards={cfg.shards})")
    train_idx = np.array_split(train_idx, cfg.shards)[cfg.shard]
    test_idx = np.array_split(test_idx, cfg.shards)[cfg.shard]
    enc, scaling = None, None
    if src.table is not None:
        enc = encoding.fit(src.table, cfg, sorted(train_idx.tolist()), src.label_names)
        x, shape = encoding.transform(enc, src.table), [enc.width]
    else:
        assert src.x is not None
        x, shape = src.x, src.shape
        if src.scale:  # with this party's own training rows' statistics (no pooled stats)
            scaling = Scaling.fit(x[train_idx])
            x = scaling.apply(x, "data")
    if cfg.feature_slice:
        x, shape = _slice_features(x, cfg.feature_slice)
    x, shape = _fit_shape(x, shape, in_shape, cfg, enc)
    n_classes = classes or (int(y.max()) + 1 if y is not None and len(y) else 0)
    train, test = _take(x, y, train_idx), _take(x, y, test_idx)
    return PartyData(train, test, shape, n_classes, enc, src.label_names, scaling)


def check_width(src: Source, cfg: DataConfig, in_shape: Sequence[int]) -> None:
    """Before a PSI alignment: refuse now a table whose width cannot fit ``in_shape``."""
    if src.table is not None and src.shape and not cfg.feature_slice:
        empty = np.zeros((0, *src.shape), dtype=np.float32)
        _fit_shape(empty, list(src.shape), in_shape, cfg, None)


def _fit_shape(
    x: np.ndarray, shape: list[int], in_shape: Sequence[int], cfg: DataConfig, enc: Encoding | None
) -> tuple[np.ndarray, list[int]]:
    """Reshape to ``model.in_shape`` when the sizes agree; otherwise say what to set."""
    want = [int(v) for v in in_shape]
    if not want or int(np.prod(want)) <= 0 or want == shape:
        return x, shape
    have = int(np.prod(shape))
    if have != int(np.prod(want)):
        what = f"data.path = {cfg.path!r}" if cfg.path else f"data.dataset = {cfg.dataset!r}"
        detail = f" after encoding ({enc.describe()})" if enc is not None else ""
        raise ConfigError(
            f"{what} gives {shape} features per sample{detail}, but model.in_shape = {want}; "
            f"set model.in_shape = {shape if len(shape) > 1 else [have]} or check the columns"
        )
    return np.ascontiguousarray(x.reshape(len(x), *want)), want


def _take(x: np.ndarray, y: np.ndarray | None, idx: np.ndarray) -> Split:
    labels = torch.from_numpy(y[idx]) if y is not None else None
    return Split(torch.from_numpy(take_rows(x, idx)), labels, torch.from_numpy(idx))


def take_rows(x: np.ndarray, idx: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``x[idx]``; rows of a memory-mapped array (a large image set) go to a new mapped file,
    copied a chunk at a time, so the split is never held in memory whole either."""
    if not isinstance(x, np.memmap):
        return np.ascontiguousarray(x[idx])
    out = mapped_array((len(idx), *x.shape[1:]), x.dtype)
    for start in range(0, len(idx), chunk):
        out[start : start + chunk] = x[idx[start : start + chunk]]
    return out


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Deterministic batches for (seed, epoch): resuming at step k needs nothing else."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return list(order.split(batch_size))


def iter_batches(
    split: Split, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """In-order batches for evaluation."""
    for start in range(0, len(split), batch_size):
        y = split.y[start : start + batch_size] if split.y is not None else None
        yield split.x[start : start + batch_size], y
