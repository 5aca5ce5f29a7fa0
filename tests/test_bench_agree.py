"""bench.agree: do saved `bench --json` runs of one build agree within 10 % on each ratio?"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import agree


def _run(path: Path, digits: float, wan: float, load: float = 1.0) -> Path:
    figures = {
        "overhead_ratio": {"digits_cnn": digits, "cifar_cnn": 1.0},
        "wan_40ms_of_bound": wan,
        "wan_40ms_depth": 16,  # not a ratio: not compared
        "load": {"overhead": {"loadavg_1min_before": load, "loadavg_1min_after": load + 0.5}},
    }
    path.write_text("progress lines the bench printed first\n" + json.dumps(figures) + "\n")
    return path


def test_runs_within_ten_percent_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [_run(tmp_path / f"r{i}.json", 1.60 + 0.05 * i, 0.85) for i in range(3)]
    assert agree.main([str(p) for p in runs]) == 0
    out = capsys.readouterr().out
    assert "overhead_ratio.digits_cnn" in out and "spread   6.2%" in out
    assert "wan_40ms_depth" not in out
    assert "load (1-minute average during each run): 1.0-1.5, 1.0-1.5, 1.0-1.5" in out


def test_one_ratio_apart_fails_and_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [_run(tmp_path / "a.json", 1.6, 0.85), _run(tmp_path / "b.json", 1.6, 0.96)]
    assert agree.main([str(p) for p in runs]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.endswith("DIFFER")] == ["wan_40ms_of_bound"]


def test_a_file_without_json_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("the bench crashed\n")
    assert agree.main([str(empty), str(_run(tmp_path / "r.json", 1.6, 0.9))]) == 2
    assert "no JSON line" in capsys.readouterr().err


def test_a_ratio_that_differs_shows_each_runs_quartiles_and_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Setup: digits apart by 12 %, each run with its pairs' spread as the bench writes it.
    paths = []
    for i, (median, q1, q3, pairs) in enumerate([(1.77, 1.67, 2.0, 40), (1.98, 1.8, 2.1, 120)]):
        path = _run(tmp_path / f"r{i}.json", median, 0.85)
        figures = json.loads(path.read_text().splitlines()[-1])
        spread = {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "pairs": pairs}
        figures["overhead_ratio_spread"] = {"digits_cnn": spread}
        path.write_text(json.dumps(figures) + "\n")
        paths.append(str(path))
    # Execute
    assert agree.main(paths) == 1
    # Check: the line under the differing ratio holds both runs' ranges; none under the rest.
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("overhead_ratio.digits_cnn"))
    assert lines[at].endswith("DIFFER")
    assert lines[at + 1].split()[:2] == ["quartiles,", "pairs"]
    assert "[1.67-2.00, 40] [1.80-2.10, 120]" in lines[at + 1]
    assert sum("quartiles" in line for line in lines) == 1
