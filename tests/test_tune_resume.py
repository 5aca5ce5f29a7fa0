"""`sl-pipeline tune` loses nothing it measured: rows are saved per setting, a rerun continues,
and a folder holding another tune's rows is refused, never overwritten."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from workers.cli import main
from workers.tools.demo import stop_process
from workers.tools.tune import TuneInterrupted, run_tune

from .conftest import ROOT
from .test_privacy_reproducible import read_until

SMALL = ["--topology", "vanilla", "--dataset", "breast_cancer", "--epochs", "1"]
SMALL += ["--attack-seeds", "1", "--no-progress"]


class FakeAudit:
    """Figures without training; counts its calls, and can signal this process on one."""

    def __init__(self, signal_on_call: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.signal_on_call = signal_on_call

    def __call__(self, topology: str, dataset: str, client: list[str], *_: Any, **__: Any):
        self.calls.append(client)
        if len(self.calls) == self.signal_on_call:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this thread
        return {"test_accuracy": 0.9 - 0.01 * len(client), "dcor": 0.5, "reconstruction_mse": 0.1}


def _tune(out: Path, sweep: str, audit: FakeAudit, epochs: int = 1) -> list[dict[str, Any]]:
    return run_tune(
        "vanilla", "digits", [sweep], epochs=epochs, progress=False, audit=audit, out=out
    )


def test_a_rerun_measures_only_the_settings_not_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a first sweep of two values
    first = _tune(tmp_path, "privacy.noise.sigma=0.5,1", FakeAudit())
    audit = FakeAudit()
    # Execute: the same tune with one more value
    rows = _tune(tmp_path, "privacy.noise.sigma=0.5,1,2", audit)
    # Assert: only sigma=2 was trained; the saved rows were taken as they were
    assert audit.calls == [["privacy.noise.sigma=2"]]
    assert rows[:3] == first and [r["name"] for r in rows] == [
        "base",
        *(f"sigma={v}" for v in ("0.5", "1", "2")),
    ]
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert "3 of 4 settings (the base run included) are already measured" in capsys.readouterr().err


def test_a_signal_keeps_the_rows_measured_before_it(tmp_path: Path) -> None:
    # Prepare: the signal goes to this process, so this must be the main thread (as in xdist)
    assert threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM)
    # Execute: SIGTERM arrives while the second setting (the third audit) is measured
    with pytest.raises(TuneInterrupted) as stopped:
        _tune(tmp_path, "privacy.noise.sigma=0.5,1", FakeAudit(signal_on_call=3))
    # Assert
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM while measuring sigma=1: 2 of 3 settings" in str(stopped.value)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in saved] == ["base", "sigma=0.5"]
    assert signal.getsignal(signal.SIGTERM) == handler  # the tune's handler is gone


def test_another_tunes_folder_is_refused_and_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a tune of one epoch saved in the folder
    _tune(tmp_path, "privacy.noise.sigma=0.5", FakeAudit())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # Execute: the same sweep at two epochs, through the CLI
    argv = ["tune", *SMALL[:4], "--epochs", "2", "--sweep", "privacy.noise.sigma=0.5"]
    status = main([*argv, "--out", str(tmp_path), "--no-progress"])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "holds another tune's results" in err[0] and "dataset 'digits' there" in err[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_results_file_of_unknown_origin_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: results.json as an older sl-pipeline wrote it, without tune.json
    (tmp_path / "results.json").write_text("[]\n")
    # Execute
    status = main(["tune", *SMALL, "--sweep", "privacy.noise.sigma=0.5", "--out", str(tmp_path)])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "without the tune.json" in err[0]
    assert (tmp_path / "results.json").read_text() == "[]\n"


def test_sigterm_through_the_console_script_then_the_same_command_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a real tune of a base and a setting, stopped once the base is saved (one
    # setting: the rerun's measuring a second one cost ~4 s and checked nothing more)
    out = tmp_path / "tuned"
    argv = ["tune", *SMALL, "--sweep", "privacy.noise.sigma=0.5", "--out", str(out)]
    script = Path(sys.executable).parent / "sl-pipeline"
    proc = subprocess.Popen(
        [str(script), *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        # the second audit's training has begun: the base row is saved by then
        started = read_until(proc, "audit: training", timeout_s=120)
        started += read_until(proc, "audit: training", timeout_s=120)
        assert started.count("audit: training") == 2, started
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
        err = started + rest
    finally:
        stop_process(proc, timeout_s=10)
    saved = json.loads((out / "results.json").read_text())
    # Assert: one line, what was kept and what to do; no traceback
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "tune interrupted by SIGTERM" in err and "rerun the same command" in err
    assert [row["name"] for row in saved] == ["base"]
    # Execute: the same command again
    status = main([*argv, "--json"])
    # Assert: it measured the rest and kept what was saved
    captured = capsys.readouterr()
    rows = json.loads(captured.out.strip().splitlines()[-1])
    assert status == 0
    assert "1 of 2 settings (the base run included) are already measured" in captured.err
    assert [r["name"] for r in rows] == ["base", "sigma=0.5"]
    assert rows[:1] == saved
    assert json.loads((out / "results.json").read_text()) == rows
