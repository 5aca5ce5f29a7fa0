"""Helpers for tests that need a real Prometheus: install it, run it, query it.

Not a conftest: import what you need (``from tests.conftest_prometheus import ...`` or
``from conftest_prometheus import ...``). ``ensure_prometheus`` installs Debian's
``prometheus`` package (which also ships ``promtool``) when the binaries are missing, and
skips the calling test only when it cannot install (not root, or no apt-get).

The calls here are blocking. From an async test whose loop also serves ``/metrics``, run
them with ``await asyncio.to_thread(query, url, expr)`` so the loop can answer scrapes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from workers.tools.ports import free_port

APT_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
_APT_LOCK = Path("/tmp/sl-pipeline-apt-prometheus.lock")


def _which_both() -> tuple[str, str] | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return (prometheus, promtool) if prometheus and promtool else None


def _apt_install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
    ):
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


@functools.cache
def ensure_prometheus() -> tuple[str, str]:
    """Paths of the ``prometheus`` and ``promtool`` binaries, installing them if needed."""
    found = _which_both()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("prometheus/promtool not installed and cannot apt-get install (not root)")
    with _APT_LOCK.open("w") as lock:  # parallel test workers install once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _which_both() is None:
            _apt_install()
    found = _which_both()
    if found is None:
        pytest.fail("apt-get installed 'prometheus' but prometheus/promtool are not on PATH")
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool ARGS`` and return the completed process (never raises on exit code)."""
    _, promtool = ensure_prometheus()
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _get_json(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""


def _launch(config: Path, data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    prometheus, _ = ensure_prometheus()
    cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=config.parent)


def start_prometheus(
    config_text: str, tmp_path: Path, *, ready_timeout_s: float = READY_TIMEOUT_S
) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prometheus on 127.0.0.1 with ``config_text``; return ``(process, base_url)``.

    The config is written to ``tmp_path/prometheus.yml`` (relative ``rule_files`` resolve
    there: copy rule files next to it), TSDB data and the log go under ``tmp_path``. Waits
    for ``/-/ready`` at most ``ready_timeout_s``; on failure the process is stopped and the
    test fails with the tail of Prometheus' log. Always pair with :func:`stop_prometheus`.
    """
    config = tmp_path / "prometheus.yml"
    config.write_text(config_text)
    log = tmp_path / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        process = _launch(config, tmp_path / "prometheus-data", port, log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if _is_ready(url):
                return process, url
            time.sleep(0.2)
        stop_prometheus(process)
        if "address already in use" not in _log_tail(log):
            break
    pytest.fail(f"Prometheus did not become ready in {ready_timeout_s}s:\n{_log_tail(log)}")


def stop_prometheus(process: subprocess.Popen[bytes]) -> None:
    """Terminate Prometheus (SIGTERM, then SIGKILL after a bounded wait)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def query(url: str, expr: str, *, at_s: float | None = None) -> list[dict[str, Any]]:
    """Evaluate ``expr`` (instant query) and return ``data.result``.

    Raises ``AssertionError`` with Prometheus' error message when the query is rejected
    (a PromQL syntax error, for example).
    """
    params = {"query": expr}
    if at_s is not None:
        params["time"] = f"{at_s:.3f}"
    target = f"{url}/api/v1/query?{urllib.parse.urlencode(params)}"
    try:
        body = _get_json(target)
    except urllib.error.HTTPError as err:
        body = json.loads(err.read() or b"{}")
    if body.get("status") != "success":
        raise AssertionError(f"query {expr!r} failed: {body.get('errorType')}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def query_until(
    url: str,
    expr: str,
    timeout_s: float,
    predicate: Callable[[list[dict[str, Any]]], bool] = bool,
    *,
    interval_s: float = 0.5,
) -> list[dict[str, Any]]:
    """Re-run ``query(url, expr)`` until ``predicate(result)`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = query(url, expr)
        if predicate(result):
            return result
        time.sleep(interval_s)
    raise AssertionError(f"{expr!r} did not match within {timeout_s}s; last result: {result}")


def api_get(url: str, path: str) -> Any:
    """``GET url + path`` of the HTTP API (``/api/v1/rules``, ``/api/v1/targets`` ...)."""
    body = _get_json(f"{url}{path}")
    if body.get("status") != "success":
        raise AssertionError(f"GET {path} failed: {body}")
    return body["data"]


__all__ = [
    "api_get",
    "ensure_prometheus",
    "free_port",
    "query",
    "query_until",
    "run_promtool",
    "start_prometheus",
    "stop_prometheus",
]
