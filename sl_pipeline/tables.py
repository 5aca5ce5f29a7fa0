"""A user's table (CSV, or Parquet through pyarrow) read as text and checked as it loads.

Every cell is kept as text until :mod:`sl_pipeline.encoding` turns the feature columns into
numbers with statistics of the training rows only. What is checked here needs no statistics:
the file's shape (empty, header only, ragged rows, repeated column names), the identifier
column (present, never empty, never repeated) and the label column. Each error names the
file, the line (CSV; the header is line 1) or row (Parquet), the column and the value, and
says what to do, so it is raised before the party ever joins the server.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .errors import ConfigError

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


def is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


@dataclass(frozen=True)
class Table:
    """Rows of text cells; ``where[i]`` says where row ``i`` came from ("line 7", "row 6")."""

    path: Path
    header: list[str]
    columns: dict[str, list[str]]
    where: list[str]
    ids: list[str] | None

    def __len__(self) -> int:
        return len(self.where)

    def take(self, rows: Sequence[int]) -> Table:
        """These rows, in this order (a split, or the order of a PSI intersection)."""
        return Table(
            self.path,
            self.header,
            {name: [cells[i] for i in rows] for name, cells in self.columns.items()},
            [self.where[i] for i in rows],
            [self.ids[i] for i in rows] if self.ids is not None else None,
        )

    def at(self, row: int, column: str) -> str:
        """The words every data error starts with: file, line/row, column."""
        return f"{self.path}, {self.where[row]}, column {column!r}"


def read_table(path: Path, cfg: DataConfig, key: str = "data.path =") -> Table:
    """Read and check one table; the id, label and image columns must exist when named.
    ``key``: how a refusal names the file (``predict``'s is ``--input``)."""
    named = f"{key} {str(path)!r}"
    if path.suffix.lower() == ".parquet":
        header, rows, where = _read_parquet(path, named)
    else:
        header, rows, where = _read_csv(path, named)
    _check_header(path, header)
    columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    keyed = [("data.id", cfg.id), ("data.label", cfg.label), ("data.image", cfg.image)]
    keyed += [("data.categorical", name) for name in cfg.categorical]  # a typo: not silent
    for key, name in keyed:
        if name and name not in columns:
            raise ConfigError(
                f"{key} = {name!r} is not a column of {path}; its columns are {header}"
            )
    table = Table(path, header, columns, where, None)
    return with_ids(table, cfg.id) if cfg.id else table


def _read_csv(path: Path, named: str) -> tuple[list[str], list[list[str]], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows, where = [], []
            for row in reader:
                if row and any(cell.strip() for cell in row):  # blank lines are skipped
                    rows.append([cell.strip() for cell in row])
                    where.append(f"line {reader.line_num}")
    except UnicodeDecodeError:
        raise ConfigError(f"{named} is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise ConfigError(f"{named} is not a valid CSV: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{named} cannot be read: {exc.strerror}") from None
    if not rows:
        raise ConfigError(f"{named} is empty; it needs a header row and data rows")
    header, body, where = rows[0], rows[1:], where[1:]
    if not body:
        raise ConfigError(f"{named} has a header row but no data rows")
    for row, place in zip(body, where, strict=True):
        if len(row) != len(header):
            raise ConfigError(
                f"{path}, {place}: {len(row)} values, but the header has {len(header)} "
                f"columns; every row needs one value per column (quote values with commas)"
            )
    return header, body, where


def _read_parquet(path: Path, named: str) -> tuple[list[str], list[list[str]], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        data = pq.read_table(path).to_pydict()
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise ConfigError(f"{named} is not a readable Parquet file: {exc}") from None
    header = [str(name) for name in data]
    count = len(next(iter(data.values()))) if data else 0
    if not header or count == 0:
        raise ConfigError(f"{named} has no data rows")
    rows = [[_cell(data[name][i]) for name in data] for i in range(count)]
    return header, rows, [f"row {i + 1}" for i in range(count)]


def _cell(value: object) -> str:
    """Parquet values as the text a CSV would hold (None: a gap; NaN reads as a gap too)."""
    return "" if value is None else str(value).strip()


def _check_header(path: Path, header: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(header):
        if not name:
            raise ConfigError(f"{path}: column {i + 1} of the header has no name; name it")
        if name in seen:
            raise ConfigError(
                f"{path}: the header names column {name!r} twice; give each column its own name"
            )
        seen.add(name)


def with_ids(table: Table, column: str) -> Table:
    """The table with ``column`` as its row ids: none missing, none repeated."""
    first: dict[str, int] = {}
    for row, value in enumerate(table.columns[column]):
        if is_missing(value):
            raise ConfigError(
                f"{table.at(row, column)}: the id is missing ({value!r}); every row needs an id"
            )
        if value in first:
            raise ConfigError(
                f"{table.at(row, column)}: id {value!r} repeats {table.where[first[value]]}; "
                "ids must be unique: remove or merge the duplicate row"
            )
        first[value] = row
    return Table(table.path, table.header, table.columns, table.where, list(table.columns[column]))


def encode_labels(
    table: Table, column: str, classes: int, names: list[str] | None = None
) -> tuple[list[int], list[str] | None]:
    """Class indices and, for text labels, the class names (sorted, so every run agrees).

    Whole numbers are used as they are; any other text becomes a class name. ``names``
    (from a saved state) fixes the mapping instead of learning it."""
    cells = table.columns[column]
    for row, value in enumerate(cells):
        if is_missing(value):
            raise ConfigError(
                f"{table.at(row, column)}: the label is missing ({value!r}); "
                "fill it in or remove the row"
            )
    numeric = names is None and all(_whole(v) is not None for v in cells)
    if numeric:
        labels = [int(_whole(v) or 0) for v in cells]
        for row, label in enumerate(labels):
            if classes and not 0 <= label < classes:
                raise ConfigError(
                    f"{table.at(row, column)}: label {cells[row]!r} is out of range for "
                    f"model.classes = {classes}; labels must be 0..{classes - 1} "
                    "(or set model.classes)"
                )
        return labels, None
    learned = names is None
    names = names if names is not None else sorted(set(cells))
    if classes and len(names) > classes:
        raise ConfigError(
            f"{table.path}, column {column!r}: {len(names)} distinct labels {shown(names)} but "
            f"model.classes = {classes}; set model.classes = {len(names)} or fix the labels"
        )
    if learned:
        check_every_class(names, classes, f"{table.path}, column {column!r}")
    index = {name: i for i, name in enumerate(names)}
    for row, value in enumerate(cells):
        if value not in index:
            raise ConfigError(
                f"{table.at(row, column)}: label {value!r} was not among the training "
                f"labels {names}"
            )
    return [index[v] for v in cells], names


def check_every_class(names: list[str], classes: int, where: str) -> None:
    """Class names are numbered in sorted order, so a party missing a class would number
    the others differently from its peers (with only 'M' rows, M would be class 0, which
    is 'B' everywhere else), and one class alone teaches nothing: refuse both."""
    if classes and len(names) < classes:
        raise ConfigError(
            f"{where}: {len(names)} distinct label(s) {shown(names)} but model.classes = "
            f"{classes}; class names are numbered in sorted order, so every party must hold "
            f"every class: check the rows (a filter?), or write the labels as 0..{classes - 1}"
        )


def shown(names: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` names, and "..." where there are more (a cut list reads whole)."""
    return str(list(names)) if len(names) <= limit else str(list(names[:limit]))[:-1] + ", ...]"


def _whole(value: str) -> int | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None
