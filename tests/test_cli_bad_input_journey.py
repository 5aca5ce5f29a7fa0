"""A hostile user's bad input, through ``workers.cli.main``: each is one line on stderr that
names the file, key or value and what to do, with exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sl_pipeline.errors import ConfigError
from sl_pipeline.tenancy import Groups
from workers.cli import main


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *named: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in named:
        assert word in err, err
    return err


def test_a_binary_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_bytes(b"\x97\xff\x00[server]\n" * 50)
    _refused(["server", "--config", str(cfg)], capsys, "server.toml", "UTF-8")


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("train.threads=100000", "at most 1024"),  # torch segfaulted
        ("train.momentum=1.5", "at most 1.0"),  # every step larger than the last
        ("server.max_clients=0", "at least 1"),  # a server that refuses everyone, forever
        ("limits.max_frames=0", "at least 1"),  # was exit 3, a protocol error
        ("limits.max_abs_value=0", "[limits]"),
    ],
)
def test_a_value_out_of_range_is_named_before_the_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text('[server]\nbind = "tcp://127.0.0.1:1"\n')
    argv = ["server", "--config", str(cfg), "--insecure", "--set", setting]
    _refused(argv, capsys, setting.split("=")[0], named)


def _npz_client(tmp_path: Path, **arrays: np.ndarray) -> Path:
    np.savez(tmp_path / "rows.npz", **arrays)  # type: ignore[arg-type]
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        '[client]\nserver = "tcp://127.0.0.1:1"\n[data]\npath = "rows.npz"\nlabel = "y"\n'
        '[model]\nbuiltin = "mlp"\nin_shape = [4]\nclasses = 3\n'
    )
    return cfg


@pytest.mark.parametrize(
    ("arrays", "named"),
    [
        ({"x": np.zeros((20, 4)), "y": np.zeros(5, dtype=np.int64)}, "one label per sample"),
        ({"x": np.zeros((20, 4)), "y": np.full(20, 0.5)}, "whole-number class labels"),
        ({"x": np.zeros((20, 4)), "y": np.array(["a"] * 20)}, "whole-number class labels"),
        ({"x": np.zeros(20), "y": np.zeros(20, dtype=np.int64)}, "at least 2 dimensions"),
        ({"x": np.array(["a"] * 20), "y": np.zeros(20, dtype=np.int64)}, "must hold numbers"),
    ],
)
def test_an_npz_of_the_wrong_shape_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arrays: dict[str, np.ndarray],
    named: str,
) -> None:
    cfg = _npz_client(tmp_path, **arrays)
    _refused(["client", "--config", str(cfg), "--insecure"], capsys, "rows.npz", named)


def test_a_file_that_is_no_npz_is_not_told_to_unpickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _npz_client(tmp_path, x=np.zeros((2, 4)))
    (tmp_path / "rows.npz").write_bytes(bytes(range(256)) * 4)
    err = _refused(["client", "--config", str(cfg), "--insecure"], capsys, "rows.npz", "savez")
    assert "pickle" not in err


def test_a_labelled_topology_without_labels_is_refused_before_joining(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it joined the server first (opening a run there), then failed at its first step
    cfg = _npz_client(tmp_path, x=np.zeros((20, 4)))
    argv = ["client", "--config", str(cfg), "--insecure", "--set", 'data.label=""']
    _refused([*argv, "--set", "client.retry_for_s=1"], capsys, "holds the labels", "data.label")


def _predict_client(tmp_path: Path) -> Path:
    import torch

    torch.save({}, tmp_path / "segment.pt")  # read for its saved encoding: none, plain numbers
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        '[client]\nserver = "tcp://127.0.0.1:1"\nsave = "segment.pt"\n'
        '[model]\nbuiltin = "mlp"\nin_shape = [3]\nclasses = 2\n'
    )
    return cfg


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ("1,2,3\n4,nan,6\n", "row 2 of the data holds NaN"),  # was the server's peer error
        ("1,inf,3\n", "row 1 of the data holds NaN"),
    ],
)
def test_predict_refuses_rows_it_cannot_send(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: str, named: str
) -> None:
    cfg = _predict_client(tmp_path)
    (tmp_path / "rows.csv").write_text(rows)
    argv = ["predict", "--config", str(cfg), "--insecure", "--input", str(tmp_path / "rows.csv")]
    _refused(argv, capsys, "rows.csv", named)


def test_predict_names_input_that_is_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _predict_client(tmp_path)
    (tmp_path / "rows.csv").write_bytes("1,2,\xe9\n".encode("latin-1"))
    argv = ["predict", "--config", str(cfg), "--insecure", "--input", str(tmp_path / "rows.csv")]
    _refused(argv, capsys, "rows.csv", "save it as UTF-8")


@pytest.mark.parametrize(
    ("saved", "setting", "rows", "named"),
    [
        ({"unknown": "ignore"}, "data.unknown=error", "west,1.0", "category 'west'"),
        ({"missing": "impute"}, "data.missing=error", "east,", "missing value ''"),
    ],
)
def test_predict_handles_unseen_categories_and_gaps_as_its_config_says(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    saved: dict[str, str],
    setting: str,
    rows: str,
    named: str,
) -> None:
    # Prepare: a segment trained with the other policy (saved with its encoding); the
    # refusals say to change data.unknown / data.missing, so predict's own config must count
    argv = _table_client(tmp_path, saved, f"clinic,size\n{rows}\n")
    # Execute / Assert
    _refused([*argv, "--set", setting], capsys, "new.csv", "line 2", named)


@pytest.mark.parametrize(
    ("text", "named"), [("", "is empty"), ("clinic,size\n", "has a header row but no data rows")]
)
def test_predict_names_its_input_not_data_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    # it said "data.path = 'new.csv' is empty", a key the user had not given
    argv = _table_client(tmp_path, {}, text)
    err = _refused(argv, capsys, f"--input '{tmp_path / 'new.csv'}' {named}")
    assert "data.path" not in err


def _table_client(tmp_path: Path, saved: dict[str, str], rows: str) -> list[str]:
    """A predict command line: a segment saved with a table's encoding, an input file."""
    import json

    import torch

    from sl_pipeline.encoding import Column, Encoding

    columns = [Column("clinic", "text", vocab=["east", "north"]), Column("size", "numeric")]
    enc = Encoding(columns, **saved).to_dict()
    torch.save({"data": json.dumps({"encoding": enc, "label_names": None})}, tmp_path / "seg.pt")
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        '[client]\nserver = "tcp://127.0.0.1:1"\nsave = "seg.pt"\n'
        '[model]\nbuiltin = "mlp"\nin_shape = [3]\nclasses = 2\n'
    )
    (tmp_path / "new.csv").write_text(rows)
    return ["predict", "--config", str(cfg), "--insecure", "--input", str(tmp_path / "new.csv")]


@pytest.mark.parametrize("given", ["server.key", "client-1.pub"])
def test_a_key_file_given_as_the_admitted_list_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    from sl_pipeline.keys import write_keypair

    write_keypair("server", tmp_path)
    write_keypair("client-1", tmp_path)  # read as 'NAME BASE64', each admitted a stranger
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        f'[server]\nbind = "tcp://127.0.0.1:1"\nkey = "server.key"\nadmitted = "{given}"\n'
    )
    _refused(["server", "--config", str(cfg)], capsys, given, "not a list of admitted keys")


def test_init_refuses_more_clients_than_a_server_admits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(["init", str(tmp_path / "site"), "--clients", "65"], capsys, "at most 64")
    assert not (tmp_path / "site").exists()  # the 65th would have waited forever


def test_runs_download_keeps_a_file_already_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "token").write_text("a-long-random-admin-token\n")
    cfg = tmp_path / "server.toml"
    cfg.write_text('[ops]\nlisten = "127.0.0.1:1"\nadmin_token = "token"\n')
    mine = tmp_path / "mine.pt"
    mine.write_text("the user's own model\n")
    argv = ["runs", "download", "run-1", "--config", str(cfg), "--out", str(mine)]
    _refused(argv, capsys, "mine.pt", "exists")
    assert mine.read_text() == "the user's own model\n"  # was overwritten without a word


@pytest.mark.parametrize("timeout", ["-1", "nan", "0", "soon"])
def test_health_names_a_timeout_that_is_no_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text('[ops]\nlisten = "127.0.0.1:1"\n')
    with pytest.raises(SystemExit) as stop:  # argparse: a usage error, one line
        main(["health", "--config", str(cfg), "--timeout", timeout])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--timeout" in err and "positive number of seconds" in err and "Traceback" not in err


def test_runs_names_an_admin_token_file_that_is_not_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "token").write_bytes(b"\xff\xfe\x00" + bytes(range(128, 256)))
    cfg = tmp_path / "server.toml"
    cfg.write_text('[ops]\nlisten = "127.0.0.1:1"\nadmin_token = "token"\n')
    _refused(["runs", "list", "--config", str(cfg)], capsys, "ops.admin_token", "not a text file")


def test_a_run_or_group_named_like_the_runs_index_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run of that name had its folder where the runs folder keeps runs.json: its model
    # could never be saved, and the run held a server.max_runs place until it stalled out
    # (red team); a group of that name, likewise
    with pytest.raises(ConfigError, match="runs folder's index"):
        Groups.from_config({"runs.json": ["client-1"]})
    client = _npz_client(tmp_path, x=np.zeros((4, 4), np.float32), y=np.zeros(4, np.int64))
    argv = ["client", "--config", str(client), "--insecure", "--set", 'client.run="runs.json"']
    _refused(argv, capsys, "client.run", "runs.json")


@pytest.mark.parametrize(
    ("setting", "named"),
    [  # each said "check the spelling in the [privacy] table" / "in the TOML file"
        ("privacy.noise.bogus=1", "[privacy.noise] table or in --set"),
        ("privacy.noise.sigma=abc", "in --set privacy.noise.sigma"),
    ],
)
def test_a_bad_privacy_override_names_its_table_and_the_flag(
    capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:
    _refused(["audit", "--topology", "vanilla", "--set", setting], capsys, named)


def test_a_csv_of_images_without_a_label_lists_its_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a CSV of image paths said only "set it to its label column in data.path = 'list.csv'"
    from PIL import Image

    rows = ["file,kind,id"]
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'dark' if i < 2 else 'light'},img-{i}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        '[client]\nserver = "tcp://127.0.0.1:1"\n[data]\npath = "list.csv"\nimage = "file"\n'
        'id = "id"\n[model]\nbuiltin = "cnn"\nin_shape = [1, 8, 8]\nclasses = 2\n'
    )
    argv = ["client", "--config", str(cfg), "--insecure", "--set", "client.retry_for_s=1"]
    err = _refused(argv, capsys, "holds the labels", "data.label", "['kind']")
    assert "'file'" not in err and "'id'" not in err  # the image and id columns are no labels
