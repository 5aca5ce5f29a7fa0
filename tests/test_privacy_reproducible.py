"""`sl-pipeline audit` is reproducible and refuses to report a run that a signal cut short."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from workers.cli import main
from workers.tools.audit import run_audit
from workers.tools.demo import stop_process

from .workerproc import WorkerProcess

VERTICAL = [
    "audit",
    "--topology",
    "vertical",
    "--dataset",
    "breast_cancer",
    "--epochs",
    "2",
    "--set",
    "privacy.noise.sigma=0.2",
    "--set",
    'privacy.label.mechanism="marvell"',
    "--set",
    "privacy.label.scale=2.0",
    "--attack-seeds",
    "1",
    "--json",
]


def audit_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_same_audit_command_twice_gives_same_figures(capsys: pytest.CaptureFixture[str]) -> None:
    # Two feature parties draw activation noise and the server draws Marvell noise in one
    # process: their draws interleave with socket timing unless each has its own generator.
    # Execute
    first = audit_json(capsys, *VERTICAL)
    second = audit_json(capsys, *VERTICAL)
    # Assert
    assert first == second
    assert first["label_leak_auc"] is not None and first["activation_epsilon"] is not None


def test_audit_figures_do_not_depend_on_the_callers_thread_count() -> None:
    # Prepare: the caller runs with two threads (a direct call used to differ from `tune`).
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # Execute
        direct = run_audit("vanilla", "breast_cancer", epochs=1, attack_seeds=1)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    single = run_audit("vanilla", "breast_cancer", epochs=1, attack_seeds=1)
    # Assert
    assert direct == single
    assert threads_after == 2  # the caller's setting is restored


def read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    """Lines of the process's stderr up to one holding ``needle`` (bounded in time)."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while needle not in seen and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                seen += proc.stderr.readline()
    return seen


def signal_once_printed(
    epochs: str, needle: str, signum: int, folder: Path
) -> tuple[int, str, str]:
    """Run `audit` in a process of its own (forked from one that imported torch once), send
    ``signum`` once its stderr shows ``needle``: (status, stdout, stderr)."""
    argv = ["audit", "--topology", "vanilla", "--epochs", epochs]
    out, err = folder / "audit.out", folder / "audit.err"
    err.touch()  # read below before the process opens it
    proc = WorkerProcess(argv, out, err)
    try:
        deadline = time.monotonic() + 120
        while needle not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()[-2000:]
            time.sleep(0.05)  # a bounded poll of the process's stderr file
        assert needle in err.read_text(), err.read_text()[-2000:]
        proc.send_signal(signum)
        proc.wait(60)
    finally:
        stop_process(proc, timeout_s=10)  # type: ignore[arg-type]
    return int(proc.wait(10)), out.read_text(), err.read_text()


def test_audit_stopped_by_sigterm_reports_incomplete_and_fails(tmp_path: Path) -> None:
    # Execute: far more epochs than the test waits for
    status, out, err = signal_once_printed("500", "audit: training", signal.SIGTERM, tmp_path)
    # Assert
    assert status == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in err and "incomplete" in err
    assert "test_accuracy" not in out and "reconstruction_mse" not in out
    # no client's resume advice: its state was in the audit's temporary folder, now gone
    assert "resumes here" not in err and "runs stop" not in err, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_audit_stopped_while_attacking_says_so_in_one_line(signum: int, tmp_path: Path) -> None:
    # Execute: a short training, then the attacks (tens of seconds at three attacker seeds)
    status, out, err = signal_once_printed("1", "audit: attacking", signum, tmp_path)
    # Assert: the exit status of the signal, one error line, no traceback, no figures
    name = signal.Signals(signum).name
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 128 + signum
    assert errors == [
        f"sl-pipeline audit: error: audit interrupted by {name} while attacking the trained "
        "model: no figures are reported (rerun the audit to completion for figures)"
    ]
    assert "Traceback" not in err and "reconstruction_mse" not in out


def test_audit_refuses_nopeek_with_dpsgd_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    status = main(
        [
            "audit",
            "--topology",
            "vanilla",
            "--set",
            "privacy.nopeek.alpha=1.0",
            "--set",
            "privacy.dpsgd.noise_multiplier=1.0",
        ]
    )
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "privacy.nopeek and privacy.dpsgd cannot be combined" in err[0]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--canary-runs", "2"], "--canary-runs 2 must be 0 (off) or at least 4"),
        (["--canary-runs", "8"], "--canary-runs audits DP-SGD; set privacy.dpsgd"),
        (
            [
                *["--canary-runs", "8", "--set", "privacy.dpsgd.noise_multiplier=1"],
                *["--set", "privacy.dpsgd.poisson_sampling=false"],
            ],
            "--canary-runs audits Poisson-sampled DP-SGD",
        ),
        (
            ["--canary-runs", "8", "--topology", "ushaped"],
            "--canary-runs applies to topology vanilla",
        ),
        (["--fsha-runs", "3", "--topology", "ushaped"], "--fsha-runs applies to topology vanilla"),
        (["--fsha-runs", "3", "--fsha-steps", "0"], "--fsha-steps 0 must be at least 1"),
    ],
)
def test_bad_canary_audit_is_refused_before_training(
    extra: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topology = [] if "--topology" in extra else ["--topology", "vanilla"]
    status = main(["audit", *topology, *extra])
    err = capsys.readouterr().err
    assert status == 2 and needle in err and "audit: training" not in err


def test_same_tune_command_twice_gives_same_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: one sweep, twice, as a user types it (two attacker seeds: the ensemble too)
    runs = []
    for out in ("first", "second"):
        argv = ["tune", "--topology", "vanilla", "--dataset", "breast_cancer", "--epochs", "1"]
        argv += ["--sweep", "privacy.noise.sigma=0.5", "--attack-seeds", "2", "--json"]
        argv += ["--no-progress", "--out", str(tmp_path / out)]
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    # Assert: the base and the setting, figure for figure
    assert runs[0] == runs[1]
    assert [r["name"] for r in runs[0]] == ["base", "sigma=0.5"]
    assert "reconstruction_mse_ensemble" in runs[0][1] and "reconstruction_target" in runs[0][1]
