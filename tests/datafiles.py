"""Users' own files for the data tests, written from scikit-learn's offline data sets."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn import datasets

COLUMNS = [name.replace(" ", "_") for name in datasets.load_breast_cancer().feature_names]


def wisconsin_rows() -> tuple[list[str], np.ndarray, list[str]]:
    """(ids, 30 features, M/B diagnosis): the public Wisconsin CSV's layout."""
    bunch = datasets.load_breast_cancer()
    ids = [f"P{842000 + 7 * i:07d}" for i in range(len(bunch.target))]
    return ids, bunch.data, ["B" if t == 1 else "M" for t in bunch.target]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def wisconsin_csv(path: Path, rows: Sequence[int] | None = None) -> Path:
    ids, x, labels = wisconsin_rows()
    chosen = range(len(ids)) if rows is None else rows
    body = [[ids[i], labels[i], *(repr(float(v)) for v in x[i])] for i in chosen]
    return write_csv(path, ["id", "diagnosis", *COLUMNS], body)


def party_csv(path: Path, rows: Sequence[int], columns: range, with_label: bool = False) -> Path:
    """One vertical party's file: its ids, its columns (and the diagnosis when it has it)."""
    ids, x, labels = wisconsin_rows()
    header = ["id", *(["diagnosis"] if with_label else []), *(COLUMNS[c] for c in columns)]
    body = [
        [ids[i], *([labels[i]] if with_label else []), *(repr(float(x[i, c])) for c in columns)]
        for i in rows
    ]
    return write_csv(path, header, body)


def digits_folder(root: Path, count: int | None = None) -> Path:
    """digits as 8x8 greyscale PNG files, one sub-folder per class."""
    bunch = datasets.load_digits()
    n = len(bunch.target) if count is None else count
    for i in range(n):
        folder = root / str(int(bunch.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (bunch.images[i] * 255.0 / 16.0).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return root
