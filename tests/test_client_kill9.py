"""A client killed without a stop (``kill -9``, the OOM killer, a power cut) in a deployment
that ``sl-pipeline init`` wrote: the same command carries on, and the server applies each
step once. Everything runs as processes of its own (init, server, clients), killed with
SIGKILL once the server's /status shows the steps wanted, never after a fixed time."""

from __future__ import annotations

import json
import signal
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from workers.tools.demo import stop_process
from workers.tools.localdeploy import free_port

from .conftest import wait_listening
from .workerproc import WorkerProcess

STEPS = 4 * 15  # breast_cancer: 455 training rows in batches of 32, every epoch


class Deployment:
    """`sl-pipeline init` into ``folder``, then its server, with /status on a free port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dir = folder / "d"
        init = self.process("init", str(self.dir), "--dataset", "breast_cancer", "--epochs", "4")
        assert init.wait(60) == 0, (folder / "init.log").read_text()
        self.client_config = self.dir / "client-1.toml"
        self.status_url = f"http://127.0.0.1:{free_port()}/status"
        listen = self.status_url.removeprefix("http://").removesuffix("/status")
        server = ["--config", str(self.dir / "server.toml"), "--set", f'ops.listen="{listen}"']
        self.server = self.process("server", *server)
        wait_listening(self.dir / "server.toml", self.server)
        self.count = 0

    def process(self, *argv: str) -> WorkerProcess:
        name = f"{argv[0]}-{len(list(self.folder.glob('*.log')))}"
        out, log = self.folder / f"{name}.out", self.folder / f"{name}.log"
        return WorkerProcess(list(argv), out, log)

    def client(self, *flags: str) -> WorkerProcess:
        """The same command every time: `sl-pipeline client --config DIR/client-1.toml`."""
        argv = ["client", "--config", str(self.client_config), "--json", "--no-progress"]
        return self.process(*argv, *flags)

    def run_info(self, run: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url, timeout=5) as reply:
            runs = json.loads(reply.read())["runs"]
        return next((r for r in runs if r["id"] == run), {"steps": 0, "state": "none"})

    def until_steps(self, run: str, steps: int, proc: WorkerProcess) -> None:
        """Until the server applied ``steps`` of ``run`` (bounded; the client still runs)."""
        deadline = time.monotonic() + 60
        while self.run_info(run)["steps"] < steps:
            assert proc.poll() is None, f"the client ended first: {proc.log.read_text()[-1500:]}"
            assert time.monotonic() < deadline, f"{run} never reached {steps} steps"
            time.sleep(0.01)

    def killed(self, run: str, steps: int, *flags: str) -> None:
        """The client command, killed with SIGKILL once ``run`` has ``steps`` applied."""
        proc = self.client(*flags)
        try:
            self.until_steps(run, steps, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL

    def finished(self, *flags: str) -> tuple[int, dict[str, Any], str]:
        """The client command to its end: exit status, JSON summary (or {}), log."""
        proc = self.client(*flags)
        code = proc.wait(120)
        lines = proc.out.read_text().strip().splitlines()
        summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        return code, summary, proc.log.read_text()

    def close(self) -> None:
        assert stop_process(self.server) == 0  # type: ignore[arg-type]


@pytest.fixture
def deployed(tmp_path: Path):  # type: ignore[no-untyped-def]
    made = Deployment(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.timeout(120)
def test_a_client_killed_by_sigkill_carries_on_with_the_same_command(deployed: Deployment) -> None:
    """It was refused as `stale_step`: back at step 0 of a run that had applied its steps."""
    # Prepare: init's client checkpoints every step, under state/; an uninterrupted run
    # (run-1) to compare with; then the same command again, a new run (its finished run's
    # checkpoint starts it afresh), killed once the server applied 5 of its steps
    section = tomllib.loads(deployed.client_config.read_text())["checkpoint"]
    assert section == {"dir": "state/client-checkpoints", "every_steps": 1, "fsync": False}
    code, clean, _ = deployed.finished()
    assert code == 0 and clean["run"] == "run-1" and clean["steps"] == STEPS
    deployed.killed("run-2", 5)
    # Execute: the same command
    code, summary, log = deployed.finished()
    # Assert: it resumed in its run and ended as the uninterrupted run did; the server
    # applied each of its steps once
    server = deployed.run_info("run-2")
    assert code == 0, log[-2000:]
    # (its checkpoint after step 4 or 5: killed after sending step 5, it resent it)
    assert summary["run"] == "run-2" and 4 <= summary["resumed_from"] < STEPS
    assert summary["steps"] == server["steps"] == clean["steps"] == STEPS
    assert server["state"] == "finished"
    assert summary["test_accuracy"] == clean["test_accuracy"]
    assert summary["train_loss"] == clean["train_loss"]


@pytest.mark.timeout(120)
def test_a_sigkill_after_a_resume_from_ctrl_c_carries_on(deployed: Deployment) -> None:
    """Ctrl-C, the same command, then kill -9 of that one: it was refused as `stale_step`."""
    # Prepare: stopped by Ctrl-C 3 steps in, resumed, and killed 5 steps later
    first = deployed.client()
    try:
        deployed.until_steps("run-1", 3, first)
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0, first.log.read_text()[-1500:]
    finally:
        if first.poll() is None:
            first.kill()
    stopped_at = deployed.run_info("run-1")["steps"]
    deployed.killed("run-1", stopped_at + 5)
    # Execute: the same command
    code, summary, log = deployed.finished()
    # Assert
    server = deployed.run_info("run-1")
    assert code == 0, log[-2000:]
    assert summary["run"] == "run-1" and stopped_at + 4 <= summary["resumed_from"] < STEPS
    assert summary["steps"] == server["steps"] == STEPS and server["state"] == "finished"


@pytest.mark.timeout(120)
def test_without_a_checkpoint_dir_a_sigkill_is_one_line_naming_what_to_do(
    deployed: Deployment,
) -> None:
    """A config without [checkpoint] dir (older deployments): the refusal says why and what
    to do, instead of telling the user to resume from a checkpoint it does not have."""
    none = ("--set", 'checkpoint.dir=""')
    deployed.killed("run-1", 20, *none)  # past the server's reply cache of 16 steps
    # (--takeover: the server would wait server.takeover_after_s for the killed session)
    code, summary, log = deployed.finished(*none, "--takeover")
    errors = [line for line in log.splitlines() if ": error:" in line]
    assert code == 4 and summary == {} and len(errors) == 1 and "Traceback" not in log, log
    assert "peer error [stale_step]: step (0, 0) is older than the steps run run-1" in errors[0]
    assert "no [checkpoint] dir" in errors[0] and "kill -9" in errors[0]
    assert "sl-pipeline runs stop run-1" in errors[0]
    assert deployed.run_info("run-1")["steps"] >= 20  # nothing applied again


@pytest.mark.timeout(120)
def test_a_checkpoint_dir_without_the_runs_steps_is_not_blamed_on_every_steps(
    deployed: Deployment,
) -> None:
    """Killed without a [checkpoint] dir, then started with init's (every step, empty): the
    line said `checkpoint.every_steps = 1 let a kill without a stop lose more. Set it to 1`."""
    deployed.killed("run-1", 20, "--set", 'checkpoint.dir=""')
    # Execute: the deployment's own command, whose checkpoint folder holds nothing of run-1
    code, summary, log = deployed.finished("--takeover")
    # Assert
    errors = [line for line in log.splitlines() if ": error:" in line]
    assert code == 4 and summary == {} and len(errors) == 1 and "Traceback" not in log, log
    assert "every_steps" not in errors[0] and "client-checkpoints" in errors[0], errors[0]
    assert "holds no checkpoint of them" in errors[0]
    assert "sl-pipeline runs stop run-1" in errors[0]
