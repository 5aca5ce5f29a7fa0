"""A user's own data: CSV and NPZ files, seeded splits, shards, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sl_pipeline.config import DataConfig
from sl_pipeline.data import load_party_data
from sl_pipeline.errors import ConfigError


def _csv(path: Path, rows: int = 50) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3))
    y = (x[:, 0] > 0).astype(int)
    lines = ["a,diagnosis,b,c"] + [
        f"{r[0]},{label},{r[1]},{r[2]}" for r, label in zip(x, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_csv_with_a_named_label_column(tmp_path: Path) -> None:
    _csv(tmp_path / "d.csv")
    data = load_party_data(DataConfig(path="d.csv", label="diagnosis", seed=1), tmp_path)
    assert data.in_shape == [3] and data.classes == 2
    assert len(data.train) + len(data.test) == 50
    assert data.train.y is not None and set(data.train.y.tolist()) <= {0, 1}
    # the split is seeded: the same seed gives the same rows
    again = load_party_data(DataConfig(path="d.csv", label="diagnosis", seed=1), tmp_path)
    assert again.train.ids.tolist() == data.train.ids.tolist()


def test_npz_with_named_arrays_and_shards(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz", images=np.zeros((40, 1, 4, 4), np.float32), target=np.arange(40) % 3
    )
    shards = [
        load_party_data(
            DataConfig(path="d.npz", features="images", label="target", shard=i, shards=2), tmp_path
        )
        for i in range(2)
    ]
    assert shards[0].in_shape == [1, 4, 4]
    ids = [set(s.train.ids.tolist()) for s in shards]
    assert not ids[0] & ids[1]  # horizontal partition: no row held twice


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (DataConfig(path="d.csv", label="nope"), "data.label"),
        (DataConfig(path="missing.csv", label="diagnosis"), "data.path"),
        (DataConfig(path="d.txt"), "data.path"),
        (DataConfig(dataset="mnist"), "data.dataset"),
        (DataConfig(path="d.csv", label="diagnosis", test_fraction=1.5), "data.test_fraction"),
        (DataConfig(path="d.csv", label="diagnosis", shard=3, shards=2), "data.shard"),
        (DataConfig(), "data.dataset"),
    ],
)
def test_bad_data_settings_name_the_key(tmp_path: Path, cfg: DataConfig, needle: str) -> None:
    _csv(tmp_path / "d.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ConfigError, match=needle):
        load_party_data(cfg, tmp_path)


def test_ragged_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(ConfigError, match="ragged"):
        load_party_data(DataConfig(path="d.csv", label="b"), tmp_path)


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_builtin_sets_are_scikit_learns_rows_without_importing_it(name: str) -> None:
    """We parse the CSVs scikit-learn ships (its import costs a worker ~1 s of CPU)."""
    from sklearn import datasets

    from sl_pipeline.sources import builtin

    x, y, shape = builtin(name)
    bunch = datasets.load_digits() if name == "digits" else datasets.load_breast_cancer()
    scale = 16.0 if name == "digits" else 1.0
    expected = (bunch.data / scale).astype(np.float32).reshape(len(bunch.data), *shape)
    assert np.array_equal(x, expected)
    assert np.array_equal(y, bunch.target)
    script = f"import sys; from sl_pipeline.sources import builtin; builtin({name!r}); "
    script += "print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
