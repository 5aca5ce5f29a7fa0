"""What a careless operator types: each mistake is one line naming it and what to do, with
the documented exit status, never a traceback, and nothing already saved is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.cli import main


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.parametrize("verb", [["init"], ["keygen", "site-a", "--out"]])
def test_an_output_folder_that_cannot_be_made_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: list[str]
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder\n")
    code, line = _fails(capsys, *verb, str(taken / "sub"))
    assert code == 2
    assert f"sl-pipeline {verb[0]}: error:" in line and str(taken) in line
    assert taken.read_text() == "not a folder\n"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--epochs", "-3"], "--epochs must be at least 1"),
        (["--seed", "-5"], "--seed must not be negative"),
        (["--topology", "splitfed", "--clients", "1"], "--clients must be at least 2"),
        (
            ["--topology", "vertical", "--dataset", "breast_cancer", "--clients", "31"],
            "--clients must be at most 30",
        ),
    ],
)
def test_init_and_demo_refuse_impossible_options_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    for verb in (["init", str(tmp_path / "d")], ["demo", "--dir", str(tmp_path / "d")]):
        code, line = _fails(capsys, *verb, *flags)
        assert code == 2 and named in line, line
        assert not (tmp_path / "d").exists()
