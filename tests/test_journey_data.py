"""A hospital engineer's own data through ``workers.cli.main``, the way docs/data.md tells it:
each mistake is one line on stderr naming the key, file or column and what to do (exit 2),
never a traceback, never another problem's advice first, never silently accepted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.datafiles import wisconsin_csv
from tests.test_cli_bad_input_journey import _refused

CLIENT = (
    '[client]\nserver = "tcp://127.0.0.1:1"\n'
    '[model]\nbuiltin = "mlp"\nin_shape = [30]\nclasses = 2\n'
    "[data]\n"
)


def _client(tmp_path: Path, data: str) -> list[str]:
    cfg = tmp_path / "client.toml"
    cfg.write_text(CLIENT + data)
    return ["client", "--config", str(cfg), "--insecure"]


def test_a_csv_without_data_label_is_told_the_label_column_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the Wisconsin layout, data.label forgotten (its text column would be one-hot
    # encoded as two more features, which made the first refusal "set model.in_shape = [32]")
    wisconsin_csv(tmp_path / "wdbc.csv")
    argv = _client(tmp_path, 'path = "wdbc.csv"\nid = "id"\n')
    # Execute / Assert
    err = _refused(argv, capsys, "data.label", "wdbc.csv", "'diagnosis'")
    assert "in_shape" not in err, err


def test_an_npz_without_data_label_is_told_to_name_the_labels_array(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "rows.npz", x=np.zeros((20, 30)), y=np.zeros(20, dtype=np.int64))
    argv = _client(tmp_path, 'path = "rows.npz"\n')
    _refused(argv, capsys, "data.label", "rows.npz", "'y'")


def test_a_categorical_column_that_is_not_in_the_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a typo in data.categorical trained with the column read as numbers, without a word
    wisconsin_csv(tmp_path / "wdbc.csv")
    data = 'path = "wdbc.csv"\nid = "id"\nlabel = "diagnosis"\ncategorical = ["mean_radus"]\n'
    _refused(_client(tmp_path, data), capsys, "data.categorical", "'mean_radus'", "wdbc.csv")


def test_a_single_npy_array_under_an_npz_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # np.save writes one array; np.load gives it back as an array, no archive (a traceback)
    with (tmp_path / "rows.npz").open("wb") as fh:
        np.save(fh, np.zeros((20, 30)))
    argv = _client(tmp_path, 'path = "rows.npz"\nlabel = "y"\n')
    _refused(argv, capsys, "rows.npz", "numpy.savez")


def test_predict_refuses_arrays_for_a_segment_trained_on_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a segment saved with the encoding of the table it was trained on
    from sl_pipeline import encoding
    from sl_pipeline.config import DataConfig
    from sl_pipeline.tables import read_table
    from workers.runtime.savedmodel import save_weights

    wisconsin_csv(tmp_path / "wdbc.csv")
    table = read_table(tmp_path / "wdbc.csv", DataConfig(id="id", label="diagnosis"))
    enc = encoding.fit(table, DataConfig(id="id", label="diagnosis"), range(len(table)), None)
    state = {"data": json.dumps({"encoding": enc.to_dict(), "label_names": ["B", "M"]})}
    save_weights(state, tmp_path / "client-1.pt", "the segment")
    np.savez(tmp_path / "new.npz", x=np.zeros((5, 30)))
    data = 'path = "wdbc.csv"\nid = "id"\nlabel = "diagnosis"\n'
    argv = [*_client(tmp_path, data), "--set", 'client.save="client-1.pt"']
    argv += ["--set", "client.retry_for_s=1"]  # no server: it went on to look for one
    argv[0] = "predict"
    # Execute / Assert: the raw arrays went to the model unencoded, unscaled, without a word
    _refused([*argv, "--input", str(tmp_path / "new.npz")], capsys, "new.npz", ".csv")


def test_a_built_in_set_with_too_few_classes_names_the_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it said "data: sample 5 has label 5", naming no key
    cfg = tmp_path / "client.toml"
    cfg.write_text(CLIENT.replace("[30]", "[1, 8, 8]") + 'dataset = "digits"\n')
    argv = ["client", "--config", str(cfg), "--insecure", "--set", "model.classes=5"]
    _refused(argv, capsys, "data.dataset = 'digits'", "model.classes = 5")


def test_a_cut_list_of_class_folders_says_it_is_cut(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "has 11 class folders ['0', ..., '9'] but model.classes = 10": ten names for eleven
    from PIL import Image

    for name in [*map(str, range(10)), "x"]:
        (tmp_path / "png" / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "png" / name / "a.png")
    cfg = tmp_path / "client.toml"
    cfg.write_text(CLIENT.replace("[30]", "[1, 8, 8]").replace("= 2", "= 10") + 'path = "png"\n')
    _refused(["client", "--config", str(cfg), "--insecure"], capsys, "11 class folders", "...]")
