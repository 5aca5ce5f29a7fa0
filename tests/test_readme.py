"""The README is executable: every `sl-pipeline ...` line in its code blocks runs, in order,
as a user types it, in a temporary folder: through the console script's own entry
(``workers.cli.console``, what the installed `sl-pipeline` binary runs: its signal handling,
flushes and exit status), in a process forked after the imports (tests/workerproc.py) rather
than a fresh interpreter, which costs 4-5 s of CPU per command (23 commands here). That the
installed binary itself starts, stops on SIGTERM and says Ctrl-C at its imports in one line is
tested by the tests that start it (test_tune_resume.py, test_ops_journey_units.py,
test_cli_interrupts.py).

Rules a README command follows so that this test can run it as written:
- lines of one code block run in order, in one temporary working folder per block;
- a line ending in ``&`` is a long-lived worker (its config has an ops port): it is started,
  and the next line runs once it answers ``/readyz`` and `sl-pipeline health` says it is
  ready; it is stopped with SIGTERM when the block ends and must then exit 0;
- training is shortened by adding ``--epochs 1`` to the verbs that take it (`audit` and
  `tune` also run on ``--dataset breast_cancer``), and the benchmark by ``--only flops``
  (its other sections are covered by test_bench_smoke.py);
- ``rows.csv`` (the input that `predict` reads) is written by this test from digits rows;
- with ``--json`` the last stdout line must be one JSON object holding the keys listed in
  ``JSON_KEYS`` for that verb.
A command added to the README is covered here with no further work.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from workers.ops.http import local_url

from .conftest import ROOT
from .workerproc import ConsoleProcess

README = ROOT / "README.md"
SHORTEN = {
    "demo": ["--epochs", "1"],
    "init": ["--epochs", "1"],
    # one attacker seed and the small table dataset: the suite's budget (digits' decoders and
    # UnSplit took 40 of the block's 55 s in CI; a digits audit runs through the CLI in
    # test_privacy_hijack_noise.py and test_privacy_reproducible.py)
    "audit": ["--epochs", "1", "--attack-seeds", "1", "--dataset", "breast_cancer"],
    "tune": ["--epochs", "1", "--no-progress", "--attack-seeds", "1", "--dataset", "breast_cancer"],
    "bench": ["--only", "flops"],
    # no Prometheus scrapes here: a finished client exits at once instead of lingering
    "client": ["--set", "ops.linger_s=0"],
}
JSON_KEYS = {
    "demo": {"topology", "dataset", "clients", "epochs", "steps", "test_accuracy", "train_loss"},
    "client": {"client", "steps", "test_accuracy", "bytes_sent", "bytes_received"},
    "predict": {"predictions"},
    "audit": {"test_accuracy", "dcor", "reconstruction_mse"},
    "bench": {"flops_table"},
}
# Commands that cannot run here, with the reason (none today).
CANNOT_RUN: dict[str, str] = {}
COMMAND_TIMEOUT_S = 600
READY_TIMEOUT_S = 60


def console_script() -> str:
    """The `sl-pipeline` entry point installed beside this interpreter."""
    script = Path(sys.executable).parent / "sl-pipeline"
    found = str(script) if script.exists() else shutil.which("sl-pipeline")
    if found is None:
        pytest.fail("the sl-pipeline console script is not installed (run `make install`)")
    return found


def readme_blocks() -> list[list[str]]:
    """The `sl-pipeline` lines of each fenced code block, comments stripped."""
    blocks: list[list[str]] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S):
        lines = []
        for raw in block.splitlines():
            line = raw.split("  #")[0].strip()
            if line.startswith("sl-pipeline "):
                lines.append(line)
        if lines:
            blocks.append(lines)
    return blocks


def block_id(block: list[str]) -> str:
    return " | ".join(line.split()[1] for line in block)


def shortened(argv: list[str]) -> list[str]:
    verb = argv[1]
    extra = [flag for flag in SHORTEN.get(verb, []) if flag.startswith("--")]
    if any(flag in argv for flag in extra):
        return argv
    return argv + SHORTEN.get(verb, [])


def write_rows(folder: Path, count: int = 5) -> None:
    x, _ = load_digits(return_X_y=True)
    rows = (x[:count] / 16.0).astype(np.float32)
    np.savetxt(folder / "rows.csv", rows, delimiter=",", fmt="%.6f")


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(cmd: list[str], proc: ConsoleProcess, cwd: Path, logs: Path) -> None:
    """Wait (bounded) until the worker answers ``/readyz``, then `sl-pipeline health` must
    answer 0 for its config. The wait polls from here: a `health` process per poll took a
    core's worth of CPU from the worker starting beside it."""
    config = cmd[cmd.index("--config") + 1]
    ops = tomllib.loads((cwd / config).read_text()).get("ops", {})
    assert ops.get("listen"), f"{config}: a README worker needs --ops"
    url = f"{local_url(ops['listen'])}/readyz"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers_ready(url):
        assert proc.poll() is None, f"{shlex.join(cmd)} exited early with {proc.returncode}"
        if time.monotonic() > deadline:
            pytest.fail(f"{shlex.join(cmd)} was not ready within {READY_TIMEOUT_S}s")
        time.sleep(0.1)  # a bounded poll of the readiness endpoint
    probe = typed(["health", "--config", config, "--timeout", "5"], cwd, logs)
    code = probe.wait(60)
    assert code == 0, f"{shlex.join(cmd)} is ready, but health says: {probe.log.read_text()}"


def typed(argv: list[str], cwd: Path, logs: Path) -> ConsoleProcess:
    """``sl-pipeline ARGV`` as typed in ``cwd``; its output in ``logs``."""
    stem = logs / f"{len(list(logs.glob('*.out')))}-{argv[0]}"
    return ConsoleProcess(argv, cwd, stem.with_suffix(".out"), stem.with_suffix(".log"))


def check_json(verb: str, stdout: str, line: str) -> None:
    if "--json" not in line.split():
        return
    last = stdout.strip().splitlines()[-1]
    result = json.loads(last)
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        missing = JSON_KEYS.get(verb, set()) - set(row)
        assert not missing, f"{line}: --json output lacks {sorted(missing)}"


def stop(proc: ConsoleProcess) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode is not None  # waited for above
    return proc.returncode


def test_the_installed_console_script_lists_every_verb() -> None:
    """The binary a user types is installed and reaches the command line (the README's
    commands run its entry in forked processes; tests that start the binary run workers)."""
    from workers.cli.commands import COMMANDS

    done = subprocess.run([console_script(), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(verb in done.stdout for verb in COMMANDS), done.stdout


def test_the_readme_has_commands_for_every_verb() -> None:
    from workers.cli.commands import COMMANDS

    verbs = {line.split()[1] for block in readme_blocks() for line in block}
    assert set(COMMANDS) - verbs == set(), "README lacks a command for these verbs"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", readme_blocks(), ids=block_id)
def test_readme_block_runs_as_typed(block: list[str], tmp_path: Path) -> None:
    cwd, logs = tmp_path / "work", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    write_rows(cwd)
    background: list[tuple[str, ConsoleProcess]] = []
    running: ConsoleProcess | None = None
    try:
        for line in block:
            if line in CANNOT_RUN:
                continue
            argv = shortened(shlex.split(line.rstrip("&").strip()))
            running = typed(argv[1:], cwd, logs)
            if line.endswith("&"):
                background.append((line, running))
                wait_ready(argv, running, cwd, logs)
                continue
            out, err = running.communicate(timeout=COMMAND_TIMEOUT_S)
            code = running.returncode
            assert code == 0, f"{line} -> exit {code}: {err[-1500:]}"
            assert "Traceback" not in err, f"{line}: {err[-1500:]}"
            check_json(argv[1], out, line)
    finally:
        if running is not None and running.poll() is None:
            running.kill()  # a foreground command past its timeout
        statuses = [(line, stop(proc), proc) for line, proc in reversed(background)]
    for line, status, proc in statuses:
        err = proc.log.read_text(errors="replace")
        assert status == 0, f"{line} stopped with {status}: {err[-1500:]}"
