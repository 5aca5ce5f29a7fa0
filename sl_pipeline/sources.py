"""Where a party's rows come from, loaded and checked before any split or connection.

A :class:`Source` is every row this party holds, in file order, with its ids when
``data.id`` names a column: a built-in set, an NPZ file, a table (CSV/Parquet, kept as text
until :mod:`sl_pipeline.encoding` fits on the training rows) or images (a class-folder tree,
or a CSV of file paths). Everything that can be checked without the split is checked here,
so a bad file ends the party with one clear line before it joins the server.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import encoding, images
from .config import DataConfig
from .errors import ConfigError
from .tables import Table, encode_labels, read_table

TABLE_SUFFIXES = (".csv", ".parquet")
BUILTIN_DATASETS = ("digits", "breast_cancer")


@dataclass(frozen=True)
class Source:
    x: np.ndarray | None  # arrays (built-in, NPZ, images); None for a table
    y: np.ndarray | None
    shape: list[int]  # a table's: [] while it depends on the training rows' vocabulary
    table: Table | None = None
    label_names: list[str] | None = None
    ids: list[str] | None = None
    scale: bool = True  # standardise arrays with the training rows' statistics
    arrays: list[str] | None = None  # an NPZ file's array names (data.features, data.label)
    columns: list[str] | None = None  # a CSV of image paths: its columns (data.label)

    def __len__(self) -> int:
        return len(self.table) if self.table is not None else len(self.x)  # type: ignore[arg-type]

    def take(self, rows: Sequence[int]) -> Source:
        """These rows in this order: a vertical party keeps only the agreed intersection."""
        idx = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            x=self.x[idx] if self.x is not None else None,
            y=self.y[idx] if self.y is not None else None,
            table=self.table.take(rows) if self.table is not None else None,
            ids=[self.ids[i] for i in rows] if self.ids is not None else None,
        )


def builtin(name: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    if name == "digits":
        table = _sklearn_bundled("digits.csv.gz", skiprows=0)
        x = (table[:, :-1] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        return x, table[:, -1].astype(np.int64), [1, 8, 8]
    if name == "breast_cancer":
        table = _sklearn_bundled("breast_cancer.csv", skiprows=1)  # a "569,30,names" header
        return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64), [30]
    raise ConfigError(f"data.dataset = {name!r} is unknown; choose one of {list(BUILTIN_DATASETS)}")


def _sklearn_bundled(filename: str, skiprows: int) -> np.ndarray:
    """A built-in set's rows, read from the CSV that scikit-learn ships with its loaders.

    Importing ``sklearn.datasets`` costs about a second of CPU (it pulls in SciPy) in every
    worker process that starts; the loaders only parse these files, so we parse them
    ourselves. ``find_spec`` locates the package without running it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the built-in datasets need scikit-learn: run `make install`")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / filename
    if not path.exists():
        raise ConfigError(f"scikit-learn's {filename} is missing ({path}): run `make install`")
    return np.loadtxt(path, delimiter=",", skiprows=skiprows, dtype=np.float64)


def from_npz(path: Path, features: str, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    where = f"data.path = {str(path)!r}"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # numpy's own words suggest unpickling: never
        raise ConfigError(
            f"{where} is not a readable .npz (a zip of .npy arrays); write it with numpy.savez"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # one .npy array under an .npz name
        raise ConfigError(
            f"{where} holds one array (a .npy file), not named arrays; write the features and "
            "labels with numpy.savez(path, x=features, y=labels)"
        )
    with archive:
        if features not in archive:
            raise ConfigError(f"data.features = {features!r} is not in {path}: {archive.files}")
        if label and label not in archive:
            raise ConfigError(f"data.label = {label!r} is not in {path}: {archive.files}")
        x, y = archive[features], archive[label] if label else None
    return _npz_features(x, where, features), _npz_labels(y, len(x), where, label)


def npz_names(path: Path) -> list[str]:
    """The arrays an NPZ file holds (read before: it opens)."""
    with np.load(path, allow_pickle=False) as archive:
        return list(archive.files)


def _npz_features(x: np.ndarray, where: str, name: str) -> np.ndarray:
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise ConfigError(
            f"{where}: array {name!r} must hold numbers, one row per sample "
            f"(at least 2 dimensions), got dtype {x.dtype} with shape {list(x.shape)}"
        )
    return x.astype(np.float32)


def _npz_labels(y: np.ndarray | None, rows: int, where: str, name: str) -> np.ndarray | None:
    if y is None:
        return None
    if y.ndim != 1 or len(y) != rows:
        raise ConfigError(
            f"{where}: array {name!r} must hold one label per sample ({rows}, as the features "
            f"have), got shape {list(y.shape)}"
        )
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise ConfigError(f"{where}: array {name!r} must hold whole-number class labels")
    return y.astype(np.int64)


def data_path(cfg: DataConfig, base: Path) -> Path:
    path = Path(cfg.path).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise ConfigError(f"data.path = {cfg.path!r}: no such file or folder ({path})")
    return path


def load_source(
    cfg: DataConfig, base: Path, classes: int = 0, in_shape: Sequence[int] = ()
) -> Source:
    """Every row of this party's data, checked; ``classes``/``in_shape`` from [model]."""
    if cfg.dataset and cfg.path:
        raise ConfigError("set data.dataset or data.path, not both")
    if cfg.dataset:
        x, y, shape = builtin(cfg.dataset)
        return Source(x, y, shape, scale=cfg.dataset != "digits")
    if not cfg.path:
        raise ConfigError(
            "set data.dataset (digits, breast_cancer) or data.path "
            "(.csv, .parquet, .npz, or a folder of images)"
        )
    path = data_path(cfg, base)
    if path.is_dir():
        x, labels, names = images.load_image_folder(path, cfg, in_shape, classes)
        return Source(x, labels, list(x.shape[1:]), label_names=names, scale=False)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays, targets = from_npz(path, cfg.features, cfg.label)
        return Source(arrays, targets, list(arrays.shape[1:]), arrays=npz_names(path))
    if suffix not in TABLE_SUFFIXES:
        raise ConfigError(
            f"data.path = {cfg.path!r} must be a .csv, .parquet or .npz file, or a folder"
        )
    if cfg.image:
        pixels, listed, texts, ids, header = images.load_image_csv(path, cfg, in_shape, classes)
        shape = list(pixels.shape[1:])
        return Source(
            pixels, listed, shape, label_names=texts, ids=ids, scale=False, columns=header
        )
    return _table_source(read_table(path, cfg), cfg, classes)


def _table_source(table: Table, cfg: DataConfig, classes: int) -> Source:
    y, names = None, None
    if cfg.label:
        labels, names = encode_labels(table, cfg.label, classes)
        y = np.asarray(labels, dtype=np.int64)
    # A dry run over every row finds stray words, NaN and gaps now, before any connection;
    # the real statistics are fitted on the training rows once the rows are known.
    enc = encoding.fit(table, cfg, range(len(table)), names)
    encoding.transform(enc, table)
    # Without one-hot columns the width does not depend on which rows train: known now.
    fixed = not any(c.kind == "text" and c.onehot for c in enc.columns)
    shape = [enc.width] if fixed else []
    return Source(None, y, shape, table=table, label_names=names, ids=table.ids)


def require_labels(src: Source, cfg: DataConfig, holder: str) -> None:
    """A party that holds the labels has none without ``data.label``: say that first, before
    a table's width (its label column read as features) gets advice about model.in_shape."""
    if src.y is not None:
        return
    where = f"data.path = {cfg.path!r}" if cfg.path else "the data"
    header = src.table.header if src.table is not None else src.columns
    if header is not None:
        columns = [c for c in header if c not in (cfg.id, cfg.image)]
        what = f"its label column in {where} (its columns: {columns})"
    elif src.arrays is not None:
        what = f"its labels' array in {where} (its arrays: {src.arrays})"
    else:
        what = f"its label column in {where}"
    raise ConfigError(f"data.label is not set, but {holder} holds the labels: set it to {what}")


def check_arrays(src: Source, where: str, classes: int) -> None:
    """Arrays from NPZ files: finite features, labels within model.classes."""
    if src.x is not None and src.x.dtype.kind == "f":
        flat = src.x.reshape(len(src.x), -1)
        bad = np.argwhere(~np.isfinite(flat))
        if len(bad):
            row, col = (int(v) for v in bad[0])
            raise ConfigError(
                f"{where}: sample {row}, feature {col} is {flat[row, col]}; "
                "replace NaN/inf values before training"
            )
    if src.y is not None and classes:
        out_of_range = np.flatnonzero((src.y < 0) | (src.y >= classes))
        if len(out_of_range):
            row = int(out_of_range[0])
            raise ConfigError(
                f"{where}: sample {row} has label {int(src.y[row])}, out of range for "
                f"model.classes = {classes}; labels must be 0..{classes - 1}"
            )
