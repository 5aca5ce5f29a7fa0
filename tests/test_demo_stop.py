"""How the demo reports its server's end: a server that ends oddly is named with its status
and the end of its log, except after a Ctrl-C, where the demo's one line is all the user gets.

Before, a demo interrupted while its server ended oddly printed that server's log above its
own line (CI: ``test_ctrl_c_during_the_demo_is_one_line_and_stops_its_workers`` saw the
server's "listening" line), and an odd end printed a bare log, no status.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from workers.tools import demo

# A server that says it listens once its SIGTERM handler is in, and then ends with status 3
# when stopped (as a crash while being stopped would)
SERVER = """
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: os._exit(3))
print("server listening (fake)", file=sys.stderr, flush=True)
open(sys.argv[1], "w").close()
signal.pause()
"""

# A client that waits for the server's handler, then either presses Ctrl-C at the demo (its
# parent) or finishes with a summary
CLIENT = """
import json, os, signal, sys, time
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)
if sys.argv[2] == "ctrl-c":
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(60)
print(json.dumps({"steps": 1}))
"""


def _fake_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, client_does: str) -> None:
    ready = str(tmp_path / "server-ready")

    def command(role: str, config: Path, *extra: str) -> list[str]:
        if role == "server":
            return [sys.executable, "-c", SERVER, ready]
        return [sys.executable, "-c", CLIENT, ready, client_does]

    monkeypatch.setattr(demo, "worker_command", command)


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, client_does: str) -> Any:
    _fake_workers(monkeypatch, tmp_path, client_does)
    files = {"server": "server.toml", "client-1": "client-1.toml"}
    return demo.run_processes(files, clients=1, show_progress=False)


def test_a_server_that_ends_oddly_is_named_with_its_status_and_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(demo.SLError):  # its stdout held no summary
        _run(monkeypatch, tmp_path, "finish")
    err = capsys.readouterr().err
    assert "the demo's server exited with status 3; its log ended with:" in err
    assert "server listening (fake)" in err


def test_after_a_ctrl_c_the_server_s_odd_end_prints_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, tmp_path, "ctrl-c")
    assert capsys.readouterr().err == ""  # was the server's log
