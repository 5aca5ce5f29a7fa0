"""Malformed user data ends the client with one clear line and exit status 2, at load time.

Every case runs the real CLI (``workers.cli.main``) against a server address where nothing
listens: the error must come from loading the data, before any connection is tried.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sl_pipeline.config import DataConfig
from sl_pipeline.data import load_party_data
from sl_pipeline.errors import ConfigError
from workers.cli import main
from workers.tools.localdeploy import free_port, to_toml

from .datafiles import write_csv

GOOD = [["id", "y", "a", "b", "c"], ["r1", "0", "1.0", "2", "x"], ["r2", "1", "3.5", "4", "y"]]
GOOD += [[f"r{i}", str(i % 2), str(i), str(i * 2), "xy"[i % 2]] for i in range(3, 12)]


def _table(rows: list[list[str]]) -> Callable[[Path], Path]:
    return lambda d: write_csv(d / "data.csv", rows[0], rows[1:])


def _edit(row: int, col: int, value: str) -> Callable[[Path], Path]:
    rows = [list(r) for r in GOOD]
    rows[row][col] = value
    return _table(rows)


def _raw(text: bytes, name: str = "data.csv") -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        (d / name).write_bytes(text)
        return d / name

    return write


def _images(sizes: list[tuple[int, int]], garbage: bool = False) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        for i, (w, h) in enumerate(sizes):
            folder = d / "images" / str(i % 2)
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("L", (w, h), color=i * 10).save(folder / f"{i}.png")
        if garbage:
            (d / "images" / "0" / "broken.png").write_bytes(b"not a png at all")
        return d / "images"

    return write


def _folder(layout: dict[str, int]) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        root = d / "images"
        root.mkdir()
        for name, count in layout.items():
            (root / name).mkdir()
            for i in range(count):
                Image.new("L", (8, 8)).save(root / name / f"{i}.png")
        return root

    return write


def _npz_nan(d: Path) -> Path:
    x = np.ones((10, 3), np.float32)
    x[4, 1] = np.nan
    np.savez(d / "data.npz", x=x, y=np.arange(10) % 2)
    return d / "data.npz"


def _image_list(d: Path) -> Path:
    _images([(8, 8), (8, 8)])(d)
    rows = [["file", "label"], ["images/0/0.png", "0"], ["images/1/missing.png", "1"]]
    return write_csv(d / "list.csv", rows[0], rows[1:])


TABLE = {"id": "id", "label": "y"}
IMAGES = {"label": ""}
CASES: list[tuple[str, Callable[[Path], Path], dict[str, Any], list[int], list[str]]] = [
    (
        "ragged row",
        _table([*GOOD[:3], ["r9", "1", "2"], *GOOD[3:]]),
        TABLE,
        [4],
        ["line 4", "3 values"],
    ),
    ("NaN value", _edit(2, 2, "NaN"), TABLE, [4], ["line 3", "column 'a'", "'NaN'", "impute"]),
    ("empty file", _raw(b""), TABLE, [4], ["is empty"]),
    ("header only", _raw(b"id,y,a,b,c\n"), TABLE, [4], ["no data rows"]),
    ("duplicate ids", _edit(5, 0, "r1"), TABLE, [4], ["line 6", "'r1' repeats line 2"]),
    (
        "label not found",
        _table(GOOD),
        {"id": "id", "label": "diagnosis"},
        [4],
        ["data.label = 'diagnosis'"],
    ),
    (
        "label out of range",
        _edit(4, 1, "7"),
        TABLE,
        [4],
        ["line 5", "label '7'", "model.classes = 2"],
    ),
    ("features not fitting in_shape", _table(GOOD), TABLE, [9], ["model.in_shape = [9]", "[4]"]),
    (
        "unreadable image",
        _images([(8, 8), (8, 8)], garbage=True),
        IMAGES,
        [1, 8, 8],
        ["broken.png", "cannot be decoded"],
    ),
    ("wrong image size", _images([(8, 8), (16, 12)]), IMAGES, [1, 8, 8], ["16x12", "data.resize"]),
    ("missing id", _edit(3, 0, ""), TABLE, [4], ["line 4", "the id is missing"]),
    (
        "id column not found",
        _table(GOOD),
        {"id": "patient", "label": "y"},
        [4],
        ["data.id = 'patient'"],
    ),
    (
        "word in a numeric column",
        _edit(6, 2, "abc"),
        TABLE,
        [4],
        ["line 7", "'abc' is not a number", "data.categorical"],
    ),
    (
        "infinite value",
        _edit(2, 3, "inf"),
        TABLE,
        [4],
        ["line 3", "column 'b'", "not a finite number"],
    ),
    ("missing label", _edit(2, 1, "NA"), TABLE, [4], ["line 3", "the label is missing"]),
    (
        "more labels than classes",
        _edit(2, 1, "maybe"),
        TABLE,
        [4],
        ["3 distinct labels", "model.classes = 2"],
    ),
    (
        "column named twice",
        _table([["id", "y", "a", "a", "c"], *GOOD[1:]]),
        TABLE,
        [4],
        ["column 'a' twice"],
    ),
    (
        "unnamed column",
        _table([["id", "y", "a", "", "c"], *GOOD[1:]]),
        TABLE,
        [4],
        ["column 4", "no name"],
    ),
    ("no such file", lambda d: d / "nowhere.csv", TABLE, [4], ["nowhere.csv", "no such file"]),
    ("not UTF-8", _raw("id,y,a,b,c\nr1,0,1,2,é\n".encode("latin-1")), TABLE, [4], ["not UTF-8"]),
    (
        "damaged Parquet",
        _raw(b"PAR1garbage", "data.parquet"),
        TABLE,
        [4],
        ["not a readable Parquet"],
    ),
    ("NaN in NPZ", _npz_nan, {"label": "y"}, [3], ["sample 4, feature 1", "NaN"]),
    ("no class folders", _folder({}), IMAGES, [1, 8, 8], ["no class sub-folders"]),
    (
        "empty class folder",
        _folder({"cat": 2, "dog": 0}),
        IMAGES,
        [1, 8, 8],
        ["'dog' has no image files"],
    ),
    (
        "too many class folders",
        _folder({"a": 1, "b": 1, "c": 1}),
        IMAGES,
        [1, 8, 8],
        ["3 class folders", "model.classes = 2"],
    ),
    (
        "listed image missing",
        _image_list,
        {"image": "file", "label": "label"},
        [1, 8, 8],
        ["line 3", "missing.png"],
    ),
]


@pytest.mark.parametrize(
    ("make", "data", "in_shape", "needles"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_malformed_input_is_one_clear_line_and_status_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], Path],
    data: dict[str, Any],
    in_shape: list[int],
    needles: list[str],
) -> None:
    # Prepare: the user's file and a client config pointing at it (nothing listens)
    path = make(tmp_path)
    config = {
        "client": {
            "server": f"tcp://127.0.0.1:{free_port()}",
            "insecure": True,
            "retry_for_s": 0.5,
            "connect_timeout_s": 0.5,
        },
        "data": {"path": str(path), **data},
        "model": {"builtin": "cnn" if len(in_shape) == 3 else "mlp", "in_shape": in_shape},
    }
    (tmp_path / "client.toml").write_text(to_toml(config))
    # Execute
    status = main(["client", "--config", str(tmp_path / "client.toml"), "--no-progress"])
    # Assert: status 2, one line, naming the place and the value
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.count("\n") == 0 and err.startswith("sl-pipeline client: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


CELLS = st.sampled_from(["", "1", "-2.5", "0.3", "x", "NaN", "inf", "?", "a,b", '"', "é", "1e309"])
LABELS = st.sampled_from(["0", "1", "1", "0", "B", "7", ""])


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.lists(st.tuples(LABELS, CELLS, CELLS, CELLS), max_size=14),
    damage=st.sampled_from(["none", "none", "none", "ragged", "duplicate id", "missing id"]),
    encode=st.sampled_from(["onehot", "ordinal"]),
    missing=st.sampled_from(["error", "impute"]),
)
def test_any_table_loads_or_fails_with_a_config_error(
    tmp_path: Path, body: list[tuple[str, ...]], damage: str, encode: str, missing: str
) -> None:
    # Prepare: id, y and three features; values drawn from what users' files hold
    rows = [[f"r{i}", *row] for i, row in enumerate(body)]
    if rows and damage == "ragged":
        rows[-1] = rows[-1][:3]
    elif rows and damage == "duplicate id":
        rows[-1][0] = "r0"
    elif rows and damage == "missing id":
        rows[0][0] = ""
    path = write_csv(tmp_path / "fuzz.csv", ["id", "y", "a", "b", "c"], rows)
    cfg = DataConfig(path=str(path), id="id", label="y", encode=encode, missing=missing)  # type: ignore[arg-type]
    # Execute / Assert: either finite data, or one clear ConfigError; never another exception
    try:
        data = load_party_data(cfg, tmp_path, 2)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert bool(torch.isfinite(data.train.x).all()) and bool(torch.isfinite(data.test.x).all())
