"""How long Prometheus waits behind scrapes whose clients left. ``python -m bench.ops_wait``

A stranger on 127.0.0.2 opens ``--left`` connections to an ops port (in this process, the
new-connection rate lifted: what is measured is the turn queue), each sending ``GET
/metrics`` and closing at once; then Prometheus on 127.0.0.1 scrapes with the token, and
its wait is printed with how many scrapes the port rendered. The first ``BURST /
SCRAPE_COST`` = 10 are answered at once; each one after that had to wait its turn (0.2 s
each), and its client had left. A request whose client left gives its turn back
(``httpguard.Throttle``); before, Prometheus waited out every one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
import urllib.request

from prometheus_client import CollectorRegistry

from workers.ops import httpguard
from workers.ops.http import OpsServer
from workers.ops.metrics import WorkerMetrics

TIMEOUT_S = 30.0
TOKEN = "bench-metrics-token-0123456789"


class CountedScrapes:
    """A collector that counts the scrapes rendered (``describe``: none at registration)."""

    def __init__(self) -> None:
        self.collects = 0

    def describe(self) -> list[object]:
        return []

    def collect(self) -> list[object]:
        self.collects += 1
        return []


def _send_and_leave(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), TIMEOUT_S, ("127.0.0.2", 0)) as sock:
            sock.sendall(
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode()
                + b"\r\n\r\n"
            )


def _prometheus(port: int) -> float:
    start = time.monotonic()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        response.read()
    return time.monotonic() - start


async def measure(left: int) -> dict[str, float]:
    httpguard.AcceptRate.allow = lambda self, address: True  # type: ignore[method-assign]
    registry = CollectorRegistry()
    counted = CountedScrapes()
    registry.register(counted)  # type: ignore[arg-type]
    metrics = WorkerMetrics("server", registry, version="1")
    ops = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0, metrics_token=TOKEN)
    await asyncio.wait_for(ops.start(), TIMEOUT_S)
    try:
        await asyncio.to_thread(_send_and_leave, ops.port, left)
        waited = await asyncio.to_thread(_prometheus, ops.port)
    finally:
        await asyncio.wait_for(ops.stop(), TIMEOUT_S)
    return {"left": left, "prometheus_wait_s": round(waited, 3), "rendered": counted.collects}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--left", type=int, default=26, help="connections that send and leave")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.left))))


if __name__ == "__main__":
    main()
