"""Data a party holds: built-in offline sets, or the user's CSV/NPZ, split with a seed.

Built-ins come from scikit-learn (no download): ``digits`` (1x8x8 images, 10 classes)
and ``breast_cancer`` (30 tabular features, 2 classes). Every sample keeps its row id
so vertically partitioned parties can align batches without sharing features.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import ConfigError

BUILTIN_DATASETS = ("digits", "breast_cancer")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor | None
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class PartyData:
    train: Split
    test: Split
    in_shape: list[int]
    classes: int


def _builtin(name: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        return x, bunch.target.astype(np.int64), [1, 8, 8]
    if name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64), [30]
    raise ConfigError(f"data.dataset = {name!r} is unknown; choose one of {list(BUILTIN_DATASETS)}")


def _from_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise ConfigError(f"data.path = {str(path)!r} cannot be read: {exc.strerror}") from None
    if len(rows) < 2:
        raise ConfigError(f"data.path = {str(path)!r} needs a header row and at least one row")
    header, body = rows[0], rows[1:]
    if label and label not in header:
        raise ConfigError(f"data.label = {label!r} is not a column of {path}; columns: {header}")
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError:
        raise ConfigError(f"data.path = {str(path)!r} has a non-numeric or ragged row") from None
    if not label:
        return table.astype(np.float32), None
    col = header.index(label)
    y = table[:, col].astype(np.int64)
    return np.delete(table, col, axis=1).astype(np.float32), y


def _from_npz(path: Path, features: str, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.path = {str(path)!r} is not a readable .npz: {exc}") from None
    with archive:
        if features not in archive:
            raise ConfigError(f"data.features = {features!r} is not in {path}: {archive.files}")
        if label and label not in archive:
            raise ConfigError(f"data.label = {label!r} is not in {path}: {archive.files}")
        x = archive[features].astype(np.float32)
        y = archive[label].astype(np.int64) if label else None
    return x, y


def load_arrays(cfg: DataConfig, base: Path) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """Features, labels (None for a party without labels) and the per-sample shape."""
    y: np.ndarray | None
    if cfg.dataset and cfg.path:
        raise ConfigError("set data.dataset or data.path, not both")
    if cfg.dataset:
        x, y, shape = _builtin(cfg.dataset)
    elif cfg.path:
        path = Path(cfg.path) if Path(cfg.path).is_absolute() else base / cfg.path
        if not path.exists():
            raise ConfigError(f"data.path = {cfg.path!r}: no such file ({path})")
        if path.suffix == ".npz":
            x, y = _from_npz(path, cfg.features, cfg.label)
        elif path.suffix == ".csv":
            x, y = _from_csv(path, cfg.label)
        else:
            raise ConfigError(f"data.path = {cfg.path!r} must end in .csv or .npz")
        shape = list(x.shape[1:])
    else:
        raise ConfigError("set data.dataset (digits, breast_cancer) or data.path (.csv/.npz)")
    if cfg.feature_slice:
        x, shape = _slice_features(x, cfg.feature_slice)
    return x, y, shape


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


def load_party_data(cfg: DataConfig, base: Path, classes: int | None = None) -> PartyData:
    x, y, shape = load_arrays(cfg, base)
    if cfg.task:
        if cfg.task not in TASKS:
            raise ConfigError(f"data.task = {cfg.task!r} is unknown; choose one of {sorted(TASKS)}")
        if y is not None:
            y = TASKS[cfg.task](y)
    train_idx, test_idx = split_indices(len(x), cfg.test_fraction, cfg.seed)
    if cfg.shards < 1 or not 0 <= cfg.shard < cfg.shards:
        raise ConfigError(f"data.shard = {cfg.shard} must be in [0, data.shards={cfg.shards})")
    train_idx = np.array_split(train_idx, cfg.shards)[cfg.shard]
    test_idx = np.array_split(test_idx, cfg.shards)[cfg.shard]
    x = _standardise(x, train_idx) if cfg.dataset != "digits" else x
    n_classes = classes or (int(y.max()) + 1 if y is not None else 0)
    return PartyData(_take(x, y, train_idx), _take(x, y, test_idx), shape, n_classes)


def _standardise(x: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    """Scale with statistics of this party's own training rows only (no pooled stats)."""
    mean = x[train_idx].mean(axis=0, keepdims=True)
    std = x[train_idx].std(axis=0, keepdims=True) + 1e-6
    return ((x - mean) / std).astype(np.float32)


def _take(x: np.ndarray, y: np.ndarray | None, idx: np.ndarray) -> Split:
    labels = torch.from_numpy(y[idx]) if y is not None else None
    return Split(torch.from_numpy(np.ascontiguousarray(x[idx])), labels, torch.from_numpy(idx))


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
