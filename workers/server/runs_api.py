"""The run management API on the server's ops port, and its client (`sl-pipeline runs`).

Routes (every one needs ``Authorization: Bearer <token>``, the token in the file named by
``[ops] admin_token``; without that key the routes answer 403):

``GET  /runs``               every run the server knows, oldest first
``GET  /runs/{id}``          one run
``POST /runs/{id}/stop``     end an active run now (its model is saved; its clients are refused)
``GET  /runs/{id}/model``    the run's server segment (``torch.save`` of its ``state_dict``)
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import torch
from aiohttp import web

from sl_pipeline.config import read_toml, resolve_path
from sl_pipeline.errors import ConfigError, ProtocolError
from workers.ops.http import local_url
from workers.server.engines.base import Engine
from workers.server.runs import Run, RunBook


class RunServer(Protocol):
    """What the run API uses of the server: its runs, and each run's engine."""

    book: RunBook

    def stop_run(self, run_id: str) -> Run: ...

    def engine_of(self, run: Run) -> Engine: ...


TOKEN_MIN_CHARS = 16


def read_token(base: Path, value: str, dotted: str = "ops.admin_token") -> str:
    path = resolve_path(base, value, dotted)
    token = path.read_text().strip()
    if len(token) < TOKEN_MIN_CHARS:
        raise ConfigError(
            f"{dotted} = {value!r}: the token is shorter than {TOKEN_MIN_CHARS} characters; "
            "write a long random one (sl-pipeline init and provision do)"
        )
    return token


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
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
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


# ---- the CLI's side ---------------------------------------------------------------------
class RunClient:
    """Calls the run API of the server whose config (or admin kit) is ``config``."""

    def __init__(self, config: Path, timeout_s: float = 10.0) -> None:
        ops = read_toml(config).get("ops", {})
        if not ops.get("listen"):
            raise ConfigError(f"{config} has no [ops] listen: the run API lives on the ops port")
        if not ops.get("admin_token"):
            raise ConfigError(f"{config} has no [ops] admin_token: the run API needs the token")
        self.config = config
        self.url = local_url(str(ops["listen"]))
        self.token = read_token(config.parent, str(ops["admin_token"]))
        self.timeout_s = timeout_s

    def call(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            raise _http_error(err, self.url) from None
        except (urllib.error.URLError, OSError) as exc:
            # exit 2, as for a worker that finds no server at start: an address or a start
            # order to fix (exit 5 means a network that failed after training had started)
            reason = getattr(exc, "reason", exc)
            hung = isinstance(reason, TimeoutError)  # it accepted, then said nothing
            todo = "is the server stuck or overloaded? else" if hung else "start the server, or"
            raise ConfigError(
                f"no server answers at {self.url} ({reason}); {todo} set [ops] listen in "
                f"{self.config} to the server's ops address"
            ) from None
        except http.client.HTTPException as exc:  # something else listens there
            raise self._not_ours(f"no HTTP reply: {type(exc).__name__}") from None

    def json(self, method: str, path: str) -> Any:
        try:
            return json.loads(self.call(method, path))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._not_ours("a reply that is not JSON") from None

    def _not_ours(self, what: str) -> ConfigError:
        return ConfigError(
            f"something answers at {self.url} ({what}), but not as an sl-pipeline server's "
            f"ops port; set [ops] listen in {self.config} to the server's ops address"
        )


def _http_error(err: urllib.error.HTTPError, url: str) -> ConfigError:
    try:
        text = json.loads(err.read() or b"{}").get("error", "")
    except (json.JSONDecodeError, AttributeError):
        text = ""
    if err.code == 401:
        return ConfigError(
            f"the server at {url} refused the admin token ({text}); "
            "use the token file from the server's [ops] admin_token"
        )
    return ConfigError(f"the server at {url} answered {err.code}: {text or err.reason}")


def format_runs(runs: list[dict[str, Any]]) -> str:
    rows = [("RUN", "STATE", "STEPS", "CLIENTS", "ACCURACY", "DURATION", "MODEL")]
    for r in runs:
        clients = ",".join(r["clients"]) or "-"
        accuracy = r.get("test_accuracy")
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        duration = f"{r['duration_s']:.1f}s"
        rows.append((r["id"], r["state"], str(r["steps"]), clients, shown, duration, r["model"]))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths, strict=True)) + "  " + row[6]
        for row in rows
    ).rstrip()


__all__ = ["RunApi", "RunClient", "format_runs", "read_token"]
