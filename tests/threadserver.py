"""A server worker in a thread of its own, for tests that call the blocking CLI beside it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

from sl_pipeline.config import ServerConfig, load
from workers.server.worker import ServerWorker


class ThreadServer:
    """A server worker in a thread of its own (its own event loop), so that the blocking
    CLI can call it from the test's thread."""

    def __init__(self, config: Path, *sets: str, worker: type[ServerWorker] = ServerWorker) -> None:
        self.worker = worker(load(ServerConfig, config, list(sets)), config.parent)
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self.worker.serve(self.stop))

    def __enter__(self) -> ServerWorker:
        self.thread.start()
        listen = self.worker.ops_cfg.listen or self.worker.listen.bind
        port = int(listen.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ready once the ops port answers
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return self.worker
            time.sleep(0.05)
        raise AssertionError("the server's ops port never opened")

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        self.loop.close()
