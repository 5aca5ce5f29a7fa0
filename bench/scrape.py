"""Does scraping ``/metrics`` slow training down? ``scrape_slowdown``.

One real server process (ops on) serves a series of identical short trainings, each by a
fresh real client process (``python -m workers client --json``, ops on, its own admitted
identity so that every run starts from step 0). Runs alternate between two conditions,
in ABBA order so that drift on a shared machine cancels out:

* ``no_scrape``: nothing touches the ops ports;
* ``scrape_100ms``: a scraper thread in this process GETs every worker's ``/metrics``
  (server and client) every 100 ms, i.e. 10x to 150x a usual Prometheus scrape interval.

A run's step time is the client's own ``wall_seconds / steps`` (start-up and imports are
not in it). ``scrape_slowdown`` is the median over pairs of (step time with the scraper) /
(step time without): 1.0 means no measurable cost. ``render_ms`` is the median time to
render one client's ``/metrics`` body in-process: what each scrape blocks a worker's loop.
Workers run as deployed (``PROMETHEUS_DISABLE_CREATED_SERIES=True``, as in the Dockerfile
and the systemd units); ``render_ms_with_created`` is the cost without that setting.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workers.tools.demo import last_json_line

from .common import (
    LOOPBACK,
    REPO,
    endpoint,
    free_port,
    median,
    stop_process,
    to_toml,
    wait_for,
    worker_process,
    write_keys,
)

INTERVAL_S = 0.1
MODEL = {"builtin": "cnn", "in_shape": [1, 8, 8], "classes": 10, "seed": 0}
TRAIN = {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "seed": 0}
CLIENT_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 1.0


class Scraper(threading.Thread):
    """GET each URL every ``interval_s`` until :meth:`stop`, over keep-alive connections
    (as Prometheus does); counts answers per URL."""

    def __init__(self, urls: list[str], interval_s: float = INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.urls, self.interval_s = urls, interval_s
        self.ok = dict.fromkeys(urls, 0)
        self.failed = 0  # a client's port is closed before it starts and after it exits
        self._stop_event = threading.Event()

    def run(self) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        try:
            while not self._stop_event.wait(self.interval_s):
                for url in self.urls:
                    parts = urlsplit(url)
                    conn = conns.get(url) or http.client.HTTPConnection(
                        parts.netloc, timeout=HTTP_TIMEOUT_S
                    )
                    try:
                        conn.request("GET", parts.path)
                        conn.getresponse().read()
                        conns[url] = conn
                        self.ok[url] += 1
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conns.pop(url, None)
                        self.failed += 1
        finally:
            for conn in conns.values():
                conn.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5 * HTTP_TIMEOUT_S * max(1, len(self.urls)))


def _ops(port: int) -> dict[str, str]:
    return {"listen": f"{LOOPBACK}:{port}", "log_level": "WARNING"}


def write_configs(folder: Path, runs: int, epochs: int) -> tuple[Path, int, list[tuple[Path, int]]]:
    """server.toml and one client TOML per run; returns them with their ops ports."""
    names = [f"scrape-{i}" for i in range(runs)]
    keys = write_keys(folder, names)
    url = endpoint(free_port())
    train = dict(TRAIN, epochs=epochs)
    server_port = free_port()
    server: dict[str, dict[str, Any]] = {
        "server": {"bind": url, "key": keys["server_key"], "admitted": keys["admitted"]},
        "model": MODEL,
        "train": train,
        "ops": _ops(server_port),
    }
    (folder / "server.toml").write_text(to_toml(server))
    clients = []
    for name in names:
        port = free_port()
        client: dict[str, dict[str, Any]] = {
            "client": {
                "server": url,
                "name": name,
                "key": f"keys/{name}.key",
                "server_key": keys["server_pub"],
            },
            "data": {"dataset": "digits", "seed": 0},
            "model": MODEL,
            "train": train,
            "ops": _ops(port),
        }
        path = folder / f"{name}.toml"
        path.write_text(to_toml(client))
        clients.append((path, port))
    return folder / "server.toml", server_port, clients


def train_once(config: Path, scrape_urls: list[str] | None) -> dict[str, Any]:
    """One client process to the end; its summary plus the scraper's counts."""
    scraper = Scraper(scrape_urls) if scrape_urls else None
    if scraper is not None:
        scraper.start()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers",
                "client",
                "--config",
                str(config),
                "--json",
                "--no-progress",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            check=False,
        )
    finally:
        if scraper is not None:
            scraper.stop()
    if done.returncode != 0:
        raise RuntimeError(f"client {config.name} failed ({done.returncode}): {done.stderr[-500:]}")
    summary = last_json_line(done.stdout)
    summary["step_s"] = summary["wall_seconds"] / max(1, summary["steps"])
    # The client's /metrics answers only while it runs: scrapes of it per second of training.
    summary["client_scrapes"] = scraper.ok[scrape_urls[-1]] if scraper and scrape_urls else 0
    return summary


def render_ms(created: bool, repeats: int = 200) -> float:
    """Median milliseconds to render a client's /metrics body in-process (the event-loop
    time one scrape costs a worker), with or without the ``*_created`` series."""
    from prometheus_client import metrics as pc_metrics

    from workers.ops.metrics import WorkerMetrics

    metrics, samples = WorkerMetrics("client"), []
    saved = pc_metrics._use_created
    pc_metrics._use_created = created  # read on every collect
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            metrics.render()
            samples.append(time.perf_counter() - start)
    finally:
        pc_metrics._use_created = saved
    return 1000 * median(samples)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def run(quick: bool = False) -> dict[str, Any]:
    # As deployed (Dockerfile, systemd units): no ``*_created`` series; children inherit it.
    os.environ["PROMETHEUS_DISABLE_CREATED_SERIES"] = "True"
    pairs, epochs = (2, 4) if quick else (4, 8)
    with tempfile.TemporaryDirectory(prefix="sl-bench-scrape-") as tmp:
        folder = Path(tmp)
        server_cfg, server_port, clients = write_configs(folder, 2 * pairs, epochs)
        server = worker_process("server", server_cfg, folder / "server.log")
        try:
            wait_for(lambda: _ready(server_port), 120, "the server's /readyz")
            samples: dict[str, list[float]] = {"no_scrape": [], "scrape_100ms": []}
            ratios, scrapes, seconds = [], 0, 0.0  # client scrapes, client wall seconds
            for pair in range(pairs):
                order = (False, True) if pair % 2 == 0 else (True, False)
                step: dict[bool, float] = {}
                for i, scraped in enumerate(order):
                    config, port = clients[2 * pair + i]
                    urls = [f"http://{LOOPBACK}:{p}/metrics" for p in (server_port, port)]
                    result = train_once(config, urls if scraped else None)
                    step[scraped] = result["step_s"]
                    samples["scrape_100ms" if scraped else "no_scrape"].append(result["step_s"])
                    if scraped:
                        scrapes += result["client_scrapes"]
                        seconds += result["wall_seconds"]
                ratios.append(step[True] / step[False])
        finally:
            stop_process(server)
    return {
        "scrape_slowdown": round(median(ratios), 3),
        "scrape": {
            "step_ms": {k: round(1000 * median(v), 3) for k, v in samples.items()},
            "pair_ratios": [round(r, 3) for r in ratios],
            "pairs": pairs,
            "epochs_per_run": epochs,
            "interval_ms": round(1000 * INTERVAL_S),
            "render_ms": round(render_ms(created=False), 3),
            "render_ms_with_created": round(render_ms(created=True), 3),
            "client_scrapes_per_s": round(scrapes / max(seconds, 1e-9), 1),
        },
    }
