"""Where `sl-pipeline tune` keeps its rows: saved after every setting, taken up again by a rerun.

A sweep of many settings runs for an hour or more, so nothing measured may be lost to a
Ctrl-C, a SIGTERM, a crash or a reboot. ``DIR/tune.json`` records what makes two tunes'
rows comparable (topology, dataset, the ``--set`` values, epochs, seed, attacker seeds, the
sl-pipeline version); ``DIR/results.json`` and ``DIR/results.csv`` are rewritten (atomically)
after each setting. A rerun into the same folder with the same identity measures only the
settings not found there, so a longer sweep reuses the settings of a shorter one. A folder
holding another tune's rows is refused, never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sl_pipeline.errors import ConfigError

MANIFEST = "tune.json"
RESULTS = "results.json"
Row = dict[str, Any]


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class TuneSpec:
    """What a tune trains besides its sweep: all its rows share these."""

    topology: str
    dataset: str
    sets: tuple[str, ...]
    epochs: int | None
    seed: int
    attack_seeds: int

    def identity(self) -> dict[str, Any]:
        """What two tunes must share for one's rows to stand beside the other's."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("sl-pipeline")
        except PackageNotFoundError:  # a source tree that was never installed
            release = "unknown"
        return {**asdict(self), "sets": list(self.sets), "sl_pipeline": release}


@dataclass
class TuneStore:
    out: Path
    identity: dict[str, Any]
    earlier: list[Row] = field(default_factory=list)  # rows a previous run saved here

    @classmethod
    def open(cls, out: Path, wanted: dict[str, Any]) -> TuneStore:
        """The store at ``out``: empty, or the rows of an earlier tune with this identity."""
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the results")
        from workers.runtime.savedmodel import check_writable  # torch: not at CLI import

        check_writable(out / RESULTS, "--out")  # now, not after the first setting trained
        manifest, results = out / MANIFEST, out / RESULTS
        if not manifest.exists():
            if results.exists():
                raise ConfigError(
                    f"--out {str(out)!r} holds a results.json without the {MANIFEST} that says "
                    "which tune made it; give a new --out folder (nothing there is overwritten)"
                )
            return cls(out, wanted)
        saved = _read_json(manifest, dict)
        if saved != wanted:
            differ = [k for k in sorted({*saved, *wanted}) if saved.get(k) != wanted.get(k)]
            detail = "; ".join(f"{k} {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
            raise ConfigError(
                f"--out {str(out)!r} holds another tune's results ({detail}); give a new --out "
                "folder, or rerun with that tune's settings to continue it"
            )
        rows = _read_json(results, list) if results.exists() else []
        if not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in rows):
            raise ConfigError(f"{results} is not a list of tune rows; give a new --out folder")
        return cls(out, wanted, rows)

    def find(self, name: str, setting: dict[str, Any] | None) -> Row | None:
        """The saved row of this setting (by its name and its values), if there is one."""
        for row in self.earlier:
            if row["name"] == name and all(row.get(k) == v for k, v in (setting or {}).items()):
                return row
        return None

    def save(self, rows: Sequence[Row]) -> dict[str, Path]:
        """Rewrite the results with ``rows`` (this sweep's, in order) and the earlier rows of
        settings this sweep does not list (kept, not lost)."""
        names = {r["name"] for r in rows}
        kept = [*rows, *(r for r in self.earlier if r["name"] not in names)]
        self.out.mkdir(parents=True, exist_ok=True)
        _replace(self.out / MANIFEST, json.dumps(self.identity, indent=2) + "\n")
        _replace(self.out / RESULTS, json.dumps(kept, indent=2) + "\n")
        _replace(self.out / "results.csv", _csv_text(kept))
        return {"csv": self.out / "results.csv", "json": self.out / RESULTS}


def _read_json(path: Path, kind: type) -> Any:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); give a new --out folder") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{path} is not a tune's {path.name}; give a new --out folder")
    return value


def _csv_text(rows: Sequence[Row]) -> str:
    """Scalar columns only, in the order they first appear."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, dict)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a kill mid-write leaves the previous file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:  # a full disk: the rows saved before stay, whole
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot save the tune's rows in {path} ({exc.strerror or exc}): free some space "
            "and run the same command again; the rows saved before are kept and not measured again"
        ) from None
