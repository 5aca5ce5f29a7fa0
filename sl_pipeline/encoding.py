"""Feature columns of a table turned into numbers, fitted on this party's training rows only.

A numeric column is standardised with the mean and spread of the training rows. A text
column becomes one-hot columns (``data.encode = "onehot"``, the default) or one ordinal code,
with the vocabulary of the training rows. Missing cells are refused with their place and
value, or imputed (``data.missing = "impute"``: the training mean, or the most frequent
training category). A category never seen in training is encoded as no category (all
one-hot columns zero, the mean code) or refused (``data.unknown = "error"``).

The fitted :class:`Encoding` is plain JSON (no pickle) and is saved with the party's
segment, so ``predict`` encodes new rows exactly as the training rows were.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import DataConfig
from .errors import ConfigError
from .tables import Table, is_missing


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "numeric" | "text"
    mean: float = 0.0
    std: float = 1.0
    fill: float | str = 0.0  # what a missing cell becomes with missing = "impute"
    vocab: list[str] = field(default_factory=list)
    onehot: bool = True  # text: one input per category, else one ordinal code

    @property
    def width(self) -> int:
        return len(self.vocab) if self.kind == "text" and self.onehot else 1


@dataclass(frozen=True)
class Encoding:
    columns: list[Column]
    unknown: str = "ignore"
    missing: str = "error"
    id: str = ""
    label: str = ""
    label_names: list[str] | None = None

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    def describe(self) -> str:
        text = [f"{c.name!r} one-hot ({c.width})" for c in self.columns if c.width > 1]
        return ", ".join(text) if text else "no text columns"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: saved beside the weights, never pickled."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Encoding:
        raw = dict(raw)
        columns = [Column(**c) for c in raw.pop("columns")]
        return cls(columns=columns, **raw)


def feature_names(table: Table, cfg: DataConfig) -> list[str]:
    skip = {cfg.id, cfg.label, cfg.image} - {""}
    return [name for name in table.header if name not in skip]


def fit(
    table: Table, cfg: DataConfig, train_rows: Sequence[int], names: list[str] | None
) -> Encoding:
    """Learn each feature column's type, statistics and vocabulary from ``train_rows``."""
    columns = [_fit_column(table, name, cfg, train_rows) for name in feature_names(table, cfg)]
    return Encoding(columns, cfg.unknown, cfg.missing, cfg.id, cfg.label, names)


def _fit_column(table: Table, name: str, cfg: DataConfig, train_rows: Sequence[int]) -> Column:
    cells = table.columns[name]
    if name in cfg.categorical or _text_column(table, name):
        seen = [cells[i] for i in train_rows if not is_missing(cells[i])]
        vocab = sorted(set(seen))
        fill = Counter(seen).most_common(1)[0][0] if seen else ""
        if cfg.encode == "onehot":
            return Column(name, "text", fill=fill, vocab=vocab, onehot=True)
        codes = [vocab.index(v) for v in seen] or [0]
        return Column(
            name, "text", float(np.mean(codes)), _spread(codes), fill, vocab, onehot=False
        )
    values = [float(cells[i]) for i in train_rows if not is_missing(cells[i])]
    values = [v for v in values if math.isfinite(v)]  # inf is refused when encoding
    if not values:
        raise ConfigError(
            f"{table.path}, column {name!r}: no value in the training rows; "
            "drop the column or fill it in"
        )
    mean = float(np.mean(values))
    return Column(name, "numeric", mean, _spread(values), mean)


def _spread(values: Sequence[float]) -> float:
    std = float(np.std(values))
    return std if std > 1e-12 else 1.0  # a constant column stays constant (zero)


def _text_column(table: Table, name: str) -> bool:
    """Text when most present cells are not numbers; a few stray words are an error."""
    cells = table.columns[name]
    present = [(row, v) for row, v in enumerate(cells) if not is_missing(v)]
    words = [(row, v) for row, v in present if not _number(v)]
    if not words:
        return False
    if len(words) * 2 >= len(present):
        return True
    row, value = words[0]
    raise ConfigError(
        f"{table.at(row, name)}: {value!r} is not a number, but the column holds numbers; "
        f"fix the value, or list {name!r} in data.categorical to read the column as text"
    )


def _number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def transform(enc: Encoding, table: Table) -> np.ndarray:
    """The encoded features of every row of ``table`` (float32, rows x ``enc.width``)."""
    for column in enc.columns:
        if column.name not in table.columns:
            raise ConfigError(
                f"{table.path} has no column {column.name!r}, which the model was trained "
                f"with; its columns are {table.header}"
            )
    parts = [_encode_column(enc, column, table) for column in enc.columns]
    if not parts:
        raise ConfigError(f"{table.path} has no feature columns besides the id and label")
    return np.concatenate(parts, axis=1).astype(np.float32)


def _encode_column(enc: Encoding, column: Column, table: Table) -> np.ndarray:
    cells = table.columns[column.name]
    out = np.zeros((len(cells), column.width), dtype=np.float64)
    index = {v: i for i, v in enumerate(column.vocab)}
    for row, value in enumerate(cells):
        if is_missing(value):
            if enc.missing == "error":
                raise ConfigError(
                    f"{table.at(row, column.name)}: missing value {value!r}; fill it in, "
                    'or set data.missing = "impute" (training mean / most frequent value)'
                )
            value = str(column.fill)
        if column.kind == "numeric":
            out[row, 0] = (_finite(table, row, column.name, value) - column.mean) / column.std
            continue
        code = index.get(value)
        if code is None:
            if enc.unknown == "error":
                raise ConfigError(
                    f"{table.at(row, column.name)}: category {value!r} was not in the training "
                    f'rows ({column.vocab[:10]}); set data.unknown = "ignore" to encode it as none'
                )
            continue  # one-hot: all zero; ordinal: zero is the training mean
        if column.onehot:
            out[row, code] = 1.0
        else:
            out[row, 0] = (code - column.mean) / column.std
    return out


def _finite(table: Table, row: int, name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"{table.at(row, name)}: {value!r} is not a number, but the column held numbers "
            f"in training; fix the value"
        ) from None
    if not math.isfinite(number):
        raise ConfigError(f"{table.at(row, name)}: {value!r} is not a finite number; fix it")
    return number
