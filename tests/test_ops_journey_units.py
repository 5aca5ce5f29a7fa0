"""The systemd units' command lines, run as the units would run them: ``ExecStart`` with the
unit's ``WorkingDirectory`` and ``Environment`` (and nothing else of the caller's), the
configs where the units read them, ``save`` and ``[checkpoint] dir`` in the state directories
as docs/deploy.md says. systemd itself cannot run here (``test_deploy.py`` verifies the
units' syntax with ``systemd-analyze verify``, with ``/bin/true`` for the binary); this
checks the part that verification cannot: that the flags, paths and variables still work.

The server serves client@1's run, stops on SIGTERM (the units' ``KillSignal``) with exit 0,
and the same command line resumes from its checkpoint. Processes of their own, each stopped
by the test; waits are for a port, a line or an exit, bounded.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import load_toml, to_toml, wait_listening
from workers.tools.demo import stop_process
from workers.tools.localdeploy import init_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
BINARY = "/opt/sl-pipeline/bin/sl-pipeline"
ROOTS = ("/etc/sl-pipeline", "/var/lib/sl-pipeline")


def unit_command(name: str, instance: str, root: Path) -> tuple[list[str], Path, dict[str, str]]:
    """ExecStart (argv), WorkingDirectory and Environment of a unit, ``%i`` = ``instance``,
    its paths moved under ``root`` and the binary replaced by this environment's script."""
    text = (UNITS / name).read_text().replace("%i", instance)
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStart", "WorkingDirectory", "Environment"):
            settings.setdefault(key, []).append(value)

    def move(value: str) -> str:
        for prefix in ROOTS:
            value = value.replace(prefix, f"{root}{prefix}")
        return value

    (exec_start,) = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == BINARY, f"{name}: ExecStart runs {argv[0]}, docs/deploy.md installs {BINARY}"
    argv = [str(Path(sys.executable).with_name("sl-pipeline")), *map(move, argv[1:])]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for line in settings["Environment"]:
        env.update(item.split("=", 1) for item in shlex.split(line))
    (cwd,) = settings["WorkingDirectory"]
    return argv, Path(move(cwd)), {k: move(v) for k, v in env.items()}


def install(root: Path) -> None:
    """docs/deploy.md section 4 on one machine: configs in /etc/sl-pipeline, each worker's
    state (and its save and checkpoints, absolute paths) in its StateDirectory."""
    etc, state = root / "etc/sl-pipeline", root / "var/lib/sl-pipeline"
    files = init_deployment(etc, clients=1, dataset="breast_cancer", epochs=1)["files"]
    for name, where in (("server", "server"), ("client-1", "client-1")):
        folder = state / where
        folder.mkdir(parents=True, mode=0o750)  # systemd's StateDirectory=
        config = load_toml(Path(files[name]))
        section = config["server" if name == "server" else "client"]
        section["save"] = str(folder / f"{name}.pt")
        config["checkpoint"]["dir"] = str(folder / "checkpoints")
        Path(files[name]).write_text(to_toml(config))


def start(name: str, instance: str, root: Path, log: Path) -> subprocess.Popen[str]:
    argv, cwd, env = unit_command(name, instance, root)
    with log.open("a") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def test_the_units_command_lines_serve_stop_and_resume(tmp_path: Path) -> None:
    install(tmp_path)
    config = tmp_path / "etc/sl-pipeline/server.toml"
    log = tmp_path / "server.log"
    server = start("sl-pipeline-server.service", "", tmp_path, log)
    try:
        wait_listening(config, server)
        client = start("sl-pipeline-client@.service", "1", tmp_path, tmp_path / "client-1.log")
        assert client.wait(120) == 0, (tmp_path / "client-1.log").read_text()[-2000:]
        # Execute: systemctl restart = SIGTERM, then the same command line
        assert stop_process(server, timeout_s=60) == 0, log.read_text()[-2000:]
        server = start("sl-pipeline-server.service", "", tmp_path, log)
        deadline = time.monotonic() + 60
        while "resumed from checkpoint" not in log.read_text():
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        stop_process(server, timeout_s=60)
    # Assert: the state went where the units let a worker write, nowhere else
    state = tmp_path / "var/lib/sl-pipeline"
    assert (state / "server/server.pt").exists() and (state / "client-1/client-1.pt").exists()
    assert any((state / "server/checkpoints").glob("server-*.ckpt"))
    assert any((state / "client-1/checkpoints").glob("client-1-*.ckpt"))
    assert not (tmp_path / "etc/sl-pipeline/state").exists()
    assert re.search(r"trained 15 steps in run run-1\b", (tmp_path / "client-1.log").read_text())
