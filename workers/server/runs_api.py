"""The run management API on the server's ops port, and its client (`sl-pipeline runs`).

Routes (every one needs ``Authorization: Bearer <token>``, the token in the file named by
``[ops] admin_token``; without that key the routes answer 403):

``GET  /runs``               every run the server knows, oldest first
``GET  /runs/{id}``          one run
``POST /runs/{id}/stop``     end an active run now (its model is saved; its clients are refused)
``GET  /runs/{id}/model``    the run's server segment (``torch.save`` of its ``state_dict``)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Protocol

import torch
from aiohttp import web

from sl_pipeline.errors import ProtocolError
from workers.ops.http import bearer_matches
from workers.ops.runsclient import read_token
from workers.server.engines.base import Engine
from workers.server.runs import Run, RunBook


class RunServer(Protocol):
    """What the run API uses of the server: its runs, and each run's engine."""

    book: RunBook

    def stop_run(self, run_id: str) -> Run: ...

    def engine_of(self, run: Run) -> Engine: ...


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


class RunApi:
    """aiohttp handlers bound to one server worker."""

    def __init__(self, server: RunServer, token: str | None) -> None:
        self.server = server
        self.token = token

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/runs", self._guard(self.list_runs))
        app.router.add_get("/runs/{run}", self._guard(self.status))
        app.router.add_post("/runs/{run}/stop", self._guard(self.stop))
        app.router.add_get("/runs/{run}/model", self._guard(self.model))

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self.token is None:
                return _error(403, "the run API is off: set [ops] admin_token on the server")
            if not bearer_matches(request, self.token):
                return _error(401, "missing or wrong admin token")
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except ProtocolError as exc:
                return _error(404, exc.message)

        return guarded

    async def list_runs(self, request: web.Request) -> web.Response:
        latest = self.server.book.latest()
        runs = [r.info() for r in self.server.book.runs.values()]
        return web.json_response({"runs": runs, "current": latest.id if latest else None})

    async def status(self, request: web.Request) -> web.Response:
        run = self.server.book.get(request.match_info["run"])
        return web.json_response(run.info())

    async def stop(self, request: web.Request) -> web.Response:
        run = self.server.stop_run(request.match_info["run"])
        return web.json_response(run.info())

    async def model(self, request: web.Request) -> web.Response:
        run = self.server.book.get(request.match_info["run"])
        if run.model and Path(run.model).exists():
            body = Path(run.model).read_bytes()
        else:  # an active run, or no runs folder: the weights as they are now
            engine = self.server.engine_of(run)
            engine.settle()
            buf = io.BytesIO()
            torch.save(engine.model.state_dict(), buf)
            body = buf.getvalue()
        return web.Response(
            body=body,
            content_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{run.id}-server.pt"'},
        )


__all__ = ["RunApi", "read_token"]
