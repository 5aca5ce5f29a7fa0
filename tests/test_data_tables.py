"""Tables as users hold them: an id column, text labels, text features, gaps; Parquet too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sl_pipeline import encoding
from sl_pipeline.config import DataConfig
from sl_pipeline.data import load_party_data
from sl_pipeline.encoding import Encoding
from sl_pipeline.errors import ConfigError
from sl_pipeline.sources import load_source
from sl_pipeline.tables import read_table
from workers.cli import main

from .conftest import Procs
from .datafiles import COLUMNS, wisconsin_csv, wisconsin_rows, write_csv

USE_CSV = ["--set", "data.dataset=", "--set", "data.id=id", "--set", "data.label=diagnosis"]


def _train(files: dict[str, Path], procs: Procs, csv: Path, *model: str) -> None:
    """Server in its own (forked) process; the client through the CLI, as a user runs it.
    ``model``: --set flags for [model], which both sides must share."""
    procs.fork("server", files["server"], *model)
    args = ["client", "--config", str(files["client-1"]), "--no-progress", "--json"]
    status = main([*args, *USE_CSV, "--set", f"data.path={csv}", *model])
    assert status == 0


def _summary(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_wisconsin_csv_trains_with_an_id_and_text_labels(
    deployment, procs: Procs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the public layout: id, diagnosis M/B, then 30 numeric columns
    csv = wisconsin_csv(tmp_path / "wdbc.csv")
    files = deployment(topology="vanilla", dataset="breast_cancer", epochs=10)
    # Execute
    _train(files, procs, csv)
    summary = _summary(capsys)
    # Assert: in_shape stays [30]: the id is not a feature, the diagnosis is the label
    assert summary["test_accuracy"] >= 0.93, summary


def _with_clinic(path: Path, rows: range, clinic: list[str], label: bool = True) -> Path:
    ids, x, labels = wisconsin_rows()
    header = ["id", *(["diagnosis"] if label else []), "clinic", *COLUMNS]
    body = [
        [ids[i], *([labels[i]] if label else []), clinic[i % len(clinic)], *x[i].tolist()]
        for i in rows
    ]
    return write_csv(path, header, body)


def test_text_feature_trains_and_predict_encodes_an_unseen_category(
    deployment, procs: Procs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a text feature column (3 clinics: one-hot, 3 more inputs)
    csv = _with_clinic(tmp_path / "train.csv", range(0, 500), ["north", "south", "east"])
    files = deployment(topology="vanilla", dataset="breast_cancer", epochs=10)
    _train(files, procs, csv, "--set", "model.in_shape=[33]")
    assert _summary(capsys)["test_accuracy"] >= 0.9
    # Execute: new rows, no label column, from a clinic never seen in training
    new = _with_clinic(tmp_path / "new.csv", range(500, 569), ["west"], label=False)
    status = main(
        [
            "predict",
            "--config",
            str(files["client-1"]),
            "--input",
            str(new),
            "--json",
            *USE_CSV,
            "--set",
            f"data.path={csv}",
            "--set",
            "model.in_shape=[33]",
        ]
    )
    # Assert: encoded like the training rows; text labels come back as names
    assert status == 0
    result = _summary(capsys)
    ids, _, labels = wisconsin_rows()
    assert result["ids"] == ids[500:569] and result["count"] == 69
    right = sum(a == b for a, b in zip(result["labels"], labels[500:569], strict=True))
    assert right / 69 >= 0.85
    saved = torch.load(files["client-1"].parent / "state" / "client-1.pt", weights_only=True)
    assert '"vocab": ["east", "north", "south"]' in saved["data"]


def test_statistics_and_vocabulary_come_from_training_rows_only(tmp_path: Path) -> None:
    # Prepare: a category and extreme values that only the test rows hold
    rows = [["id", "y", "size", "colour"]]
    rows += [[f"r{i}", str(i % 2), str(float(i)), "red" if i % 3 else "blue"] for i in range(40)]
    write_csv(tmp_path / "t.csv", rows[0], rows[1:])
    data = load_party_data(DataConfig(path="t.csv", id="id", label="y"), tmp_path, 2)
    train_ids = data.train.ids.tolist()
    test_ids = data.test.ids.tolist()
    # Assert: the mean/spread are those of the training rows; the vocabulary too
    assert data.encoding is not None
    size = data.encoding.columns[0]
    assert size.mean == pytest.approx(float(np.mean(train_ids)))
    assert size.std == pytest.approx(float(np.std(train_ids)))
    assert data.test.x[:, 0].tolist() == pytest.approx(
        [(i - size.mean) / size.std for i in test_ids], abs=1e-5
    )
    assert data.encoding.columns[1].vocab == ["blue", "red"] and data.in_shape == [3]


def test_gaps_are_imputed_when_asked_and_ordinal_encoding(tmp_path: Path) -> None:
    rows = [["id", "y", "size", "grade"]]
    rows += [[f"r{i}", str(i % 2), "" if i == 3 else str(i), "abc"[i % 3]] for i in range(30)]
    write_csv(tmp_path / "t.csv", rows[0], rows[1:])
    with pytest.raises(ConfigError, match=r"line 5, column 'size': missing value ''"):
        load_party_data(DataConfig(path="t.csv", id="id", label="y"), tmp_path, 2)
    cfg = DataConfig(path="t.csv", id="id", label="y", missing="impute", encode="ordinal")
    data = load_party_data(cfg, tmp_path, 2)
    assert data.in_shape == [2] and bool(torch.isfinite(data.train.x).all())


def test_parquet_loads_like_the_same_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    wisconsin_csv(tmp_path / "w.csv", range(100))
    ids, x, labels = wisconsin_rows()
    columns = {"id": ids[:100], "diagnosis": labels[:100]}
    columns.update({name: x[:100, c].tolist() for c, name in enumerate(COLUMNS)})
    pq.write_table(pa.table(columns), tmp_path / "w.parquet")
    cfg = DataConfig(path="w.csv", id="id", label="diagnosis")
    from_csv = load_party_data(cfg, tmp_path, 2, [30])
    from_parquet = load_party_data(
        DataConfig(path="w.parquet", id="id", label="diagnosis"), tmp_path, 2, [30]
    )
    assert torch.allclose(from_csv.train.x, from_parquet.train.x)
    assert torch.equal(from_csv.train.y, from_parquet.train.y)  # type: ignore[arg-type]
    assert load_source(cfg, tmp_path).ids == ids[:100]


@pytest.mark.parametrize("encode", ["onehot", "ordinal"])
def test_an_unseen_category_is_encoded_as_none_or_refused_as_configured(
    tmp_path: Path, encode: str
) -> None:
    # Prepare: an encoding fitted on two colours
    rows = [["id", "y", "colour"]] + [[f"r{i}", str(i % 2), "rb"[i % 2]] for i in range(20)]
    write_csv(tmp_path / "t.csv", rows[0], rows[1:])
    cfg = DataConfig(path="t.csv", id="id", label="y", encode=encode)
    enc = load_party_data(cfg, tmp_path, 2).encoding
    assert enc is not None
    new = read_table(
        write_csv(tmp_path / "n.csv", ["id", "colour"], [["n1", "r"], ["n2", "green"]]),
        DataConfig(),
    )
    # Execute / Assert: "ignore" encodes green as no colour (the training mean for ordinal)
    x = encoding.transform(enc, new)
    assert x[1].tolist() == [0.0] * x.shape[1] and x[0].tolist() != x[1].tolist()
    strict = Encoding.from_dict({**enc.to_dict(), "unknown": "error"})
    with pytest.raises(ConfigError, match=r"n.csv, line 3, column 'colour': category 'green'"):
        encoding.transform(strict, new)
