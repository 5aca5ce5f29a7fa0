"""The run management API on the server's ops port, and its client (`sl-pipeline runs`).

Routes (every one needs ``Authorization: Bearer <token>``, the token in the file named by
``[ops] admin_token``, or a group's token, ``[server] groups``: that one sees and acts on its
group's runs only, another group's run being one that does not exist; without any token
configured the routes answer 403):

``GET  /runs``               every run the server knows, oldest first
``GET  /runs/{id}``          one run
``POST /runs/{id}/stop``     end an active run now (its model is saved; its clients are refused)
``GET  /runs/{id}/model``    the run's server segment (``torch.save`` of its ``state_dict``), sent
                             in chunks as the client reads them

A run the server removed (``server.keep_ended_runs``, ``server.keep_ended_for_s``: see
:mod:`workers.server.retention`) is answered ``410 Gone``, saying when and why.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from aiohttp import web

from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.tenancy import Groups
from workers.ops.http import bearer_matches
from workers.ops.runsclient import read_token
from workers.server.engines.base import Engine
from workers.server.retention import RunFolders
from workers.server.runs import Run, RunBook

CHUNK = 1 << 20  # bytes of a model read and sent at a time
SNAPSHOTS = 2  # active runs' models in memory at once, being sent
SNAPSHOT_EVERY_S = 10.0  # an active run's model is saved (in the event loop) this seldom


class RunServer(Protocol):
    """What the run API uses of the server: its runs, and each run's engine."""

    book: RunBook
    folders: RunFolders  # ended runs removed (server.keep_ended_*)

    def stop_run(self, key: str, group: str | None = None) -> Run: ...

    def engine_of(self, run: Run) -> Engine: ...

    def kept(self, run: Run) -> Run: ...


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _busy(retry_s: int) -> web.Response:
    text = (
        f"an active run's model is saved for download once every {SNAPSHOT_EVERY_S:.0f}s, "
        f"{SNAPSHOTS} at a time; try again in {retry_s}s"
    )
    return web.json_response({"error": text}, status=503, headers={"Retry-After": str(retry_s)})


def group_tokens(
    base: Path,
    groups: Groups,
    admin: str | None = None,
    status: str = "",
    metrics: str = "",
    status_key: str = "ops.status_token",
) -> dict[str, str]:
    """Each group's run-API token (read from its file) -> the group it opens. A token that
    is another group's or the operator's (``admin``, which opens every run, ``status`` or
    ``metrics``, which Prometheus holds) would open more than its group's runs, as would an
    admin token that Prometheus holds, or that /status asks for: the server does not start."""
    if metrics and metrics == admin:
        raise ConfigError(
            "ops.metrics_token holds the token of ops.admin_token, so whoever scrapes /metrics "
            "could stop and download runs; give /metrics a token of its own"
        )
    # a status token equal to the metrics token: refused for every worker as the metrics
    # token is read (workers.runtime.startup.check_status_token), before this runs
    if status and status == admin:
        raise ConfigError(
            f"{status_key} is the token of ops.admin_token, so whoever may read /status's "
            "names (or the config it is written in) could stop and download runs; give /status "
            "a token of its own"
        )
    taken = {"ops.admin_token": admin, status_key: status, "ops.metrics_token": metrics}
    owners = {token: where for where, token in taken.items() if token}
    out: dict[str, str] = {}
    for group, path in groups.tokens.items():
        where = f"server.groups.{group}.token"
        token = read_token(base, path, where)
        if token in owners:
            raise ConfigError(
                f"{where} = {path!r} holds the token of {owners[token]}, so it would open "
                "more than its group's runs; give each group a token of its own"
            )
        owners[token], out[token] = where, groups.namespace(group)
    return out


class RunApi:
    """aiohttp handlers bound to one server worker."""

    def __init__(
        self, server: RunServer, token: str | None, group_tokens: dict[str, str] | None = None
    ) -> None:
        self.server = server
        self.token = token
        self.group_tokens = group_tokens or {}  # token -> the group whose runs it opens
        self.snapshots = 0  # active runs' models being sent
        self.snapshot_at = -SNAPSHOT_EVERY_S  # when the last was taken (monotonic)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/runs", self._guard(self.list_runs))
        app.router.add_get("/runs/{run}", self._guard(self.status))
        app.router.add_post("/runs/{run}/stop", self._guard(self.stop))
        app.router.add_get("/runs/{run}/model", self._guard(self.model))

    def _scope(self, request: web.Request) -> str | bool | None:
        """Whose runs the request's token opens: every one (None), a group's (its name),
        or none (False). Every token is compared, in constant time each."""
        scopes = [g for t, g in self.group_tokens.items() if bearer_matches(request, t)]
        if self.token is not None and bearer_matches(request, self.token):
            return None
        return scopes[0] if scopes else False

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self.token is None and not self.group_tokens:
                return _error(403, "the run API is off: set [ops] admin_token on the server")
            scope = self._scope(request)
            if scope is False:
                return _error(401, "missing or wrong admin token")
            try:
                return await handler(request, scope)  # type: ignore[no-any-return]
            except ProtocolError as exc:  # no such run, or one whose files were removed
                whose = None if scope is None else str(scope)
                gone = self.server.folders.gone(request.match_info.get("run", ""), whose)
                return _error(404, exc.message) if gone is None else _error(410, gone)

        return guarded

    async def list_runs(self, request: web.Request, scope: str | None) -> web.Response:
        book = self.server.book
        latest = book.latest(scope)
        runs = [r.info() for r in book.runs.values() if scope in (None, r.group)]
        return web.json_response({"runs": runs, "current": latest.key if latest else None})

    async def status(self, request: web.Request, scope: str | None) -> web.Response:
        run = self.server.book.get(request.match_info["run"], scope)
        return web.json_response(run.info())

    async def stop(self, request: web.Request, scope: str | None) -> web.Response:
        run = self.server.stop_run(request.match_info["run"], scope)
        return web.json_response(run.info())

    async def model(self, request: web.Request, scope: str | None) -> web.StreamResponse:
        """Sent in chunks as the client reads them: a saved model from its file (a save
        meanwhile replaces the file, and this one stays whole), an active run's as its
        weights are now: saving them holds the event loop (training), so one every
        :data:`SNAPSHOT_EVERY_S` at most, :data:`SNAPSHOTS` of them in memory at once."""
        run = self.server.kept(self.server.book.get(request.match_info["run"], scope))
        name = f'attachment; filename="{run.id}-server.pt"'
        response = web.StreamResponse(headers={"Content-Disposition": name})
        response.content_type = "application/octet-stream"
        if run.model and Path(run.model).exists():
            with Path(run.model).open("rb") as fh:
                response.content_length = os.fstat(fh.fileno()).st_size
                await response.prepare(request)
                loop = asyncio.get_running_loop()
                while body_wanted(request) and (
                    chunk := await loop.run_in_executor(None, fh.read, CHUNK)
                ):
                    await response.write(chunk)
        else:  # an active run, or no runs folder: the weights as they are now
            wait = self.snapshot_at + SNAPSHOT_EVERY_S - time.monotonic()
            if self.snapshots >= SNAPSHOTS or wait > 0:
                return _busy(max(1, math.ceil(wait)))
            self.snapshot_at = time.monotonic()
            engine = self.server.engine_of(run)
            engine.settle()
            buf = io.BytesIO()
            torch.save(engine.model.state_dict(), buf)
            self.snapshots += 1
            try:
                body = buf.getbuffer()
                response.content_length = len(body)
                await response.prepare(request)
                for start in range(0, len(body) if body_wanted(request) else 0, CHUNK):
                    await response.write(body[start : start + CHUNK])
            finally:
                self.snapshots -= 1
        await response.write_eof()
        return response


def body_wanted(request: web.Request) -> bool:
    """Not for ``HEAD``: a body written after its head would be read as the answer to the
    connection's next request (aiohttp leaves a streamed body to the handler)."""
    return request.method != "HEAD"


__all__ = ["RunApi", "group_tokens", "read_token"]
