"""Image files as users hold them: a folder per class, or a CSV listing files and labels."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sl_pipeline.config import ClientConfig, DataConfig, load
from sl_pipeline.data import load_party_data, take_rows
from workers.cli import main
from workers.client.predict import read_inputs

from .conftest import Procs
from .datafiles import digits_folder, write_csv


def test_a_folder_of_digit_pngs_trains_through_the_cli(
    deployment, procs: Procs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: 1,797 PNG files in ten class folders
    folder = digits_folder(tmp_path / "digits")
    assert len(list(folder.rglob("*.png"))) >= 1000
    # 4 epochs read 0.972 (12 read 0.986): well clear of 0.95, which wrong labels or pixels miss
    files = deployment(topology="vanilla", dataset="digits", epochs=4)
    procs.fork("server", files["server"])
    # Execute: the user points data.path at the folder
    status = main(
        [
            "client",
            "--config",
            str(files["client-1"]),
            "--no-progress",
            "--json",
            "--set",
            "data.dataset=",
            "--set",
            f"data.path={folder}",
        ]
    )
    # Assert
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= 0.95, summary


def test_a_csv_of_paths_with_resizing_and_streaming(tmp_path: Path) -> None:
    # Prepare: 16x16 RGB files listed with text labels; the model wants 1x8x8
    rows = [["file", "kind", "id"]]
    for i in range(12):
        shade = 20 * i
        Image.new("RGB", (16, 16), color=(shade, shade, shade)).save(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", "dark" if i < 6 else "light", f"img-{i}"])
    write_csv(tmp_path / "list.csv", rows[0], rows[1:])
    cfg = DataConfig(path="list.csv", image="file", label="kind", id="id", resize=True)
    # Execute: once in memory, once through a memory-mapped file (limit 0 MB)
    held = load_party_data(cfg, tmp_path, 2, [1, 8, 8])
    streamed = load_party_data(
        DataConfig(**{**cfg.__dict__, "max_memory_mb": 0}), tmp_path, 2, [1, 8, 8]
    )
    # Assert: the same pixels, scaled to [0, 1]; labels by sorted name
    assert held.in_shape == [1, 8, 8] and held.label_names == ["dark", "light"]
    assert torch.equal(held.train.x, streamed.train.x)
    first = int(held.train.ids[0])
    assert float(held.train.x[0].mean()) == pytest.approx(20 * first / 255, abs=1e-3)
    assert held.train.y is not None
    assert held.train.y.tolist() == [int(i >= 6) for i in held.train.ids.tolist()]


def test_folder_classes_are_sorted_names(tmp_path: Path) -> None:
    for name in ("zebra", "ant"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            value = 0 if name == "ant" else 255
            Image.fromarray(np.full((4, 4), value, np.uint8)).save(
                tmp_path / "imgs" / name / f"{i}.png"
            )
    data = load_party_data(DataConfig(path="imgs", test_fraction=0.5), tmp_path, 2, [1, 4, 4])
    assert data.label_names == ["ant", "zebra"]
    for split in (data.train, data.test):
        assert split.y is not None
        assert split.y.tolist() == [int(v > 0.5) for v in split.x.mean(dim=(1, 2, 3)).tolist()]


def test_a_memory_mapped_set_is_split_into_mapped_files() -> None:
    with tempfile.TemporaryFile() as fh:
        source = np.memmap(fh, np.float32, "w+", shape=(600, 1, 2, 2))
        source[:] = np.arange(600, dtype=np.float32).reshape(600, 1, 1, 1)
        idx = np.random.default_rng(0).permutation(600)[:500]
        rows = take_rows(source, idx)
        assert isinstance(rows, np.memmap)
        assert rows[:, 0, 0, 0].tolist() == idx.astype(np.float32).tolist()
        assert torch.from_numpy(rows).shape == (500, 1, 2, 2)


def test_predict_reads_a_folder_of_images_named_by_file(tmp_path: Path) -> None:
    folder = digits_folder(tmp_path / "digits", count=12)
    cfg = load(ClientConfig, _client_toml(tmp_path))
    inputs = read_inputs(cfg, folder)
    assert inputs.x.shape == (12, 1, 8, 8) and inputs.ids is not None
    assert inputs.ids[0] == "0/00000.png" and len(set(inputs.ids)) == 12


def _client_toml(folder: Path) -> Path:
    path = folder / "client.toml"
    path.write_text('[model]\nbuiltin = "cnn"\nin_shape = [1, 8, 8]\nclasses = 10\n')
    return path
