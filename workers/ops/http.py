"""The operations HTTP endpoint of a worker: metrics, liveness, readiness and status.

:class:`OpsServer` runs an aiohttp ``AppRunner`` on a ``GuardedSite`` (``httpguard``: what a
client can hold) inside the worker's own event loop (no thread, no second loop), so the
handlers read the worker's state directly. Routes:

``GET /metrics``  Prometheus text format (OpenMetrics when the scraper asks for it); each
                  answered scrape is counted, so a finished client can wait for the
                  scrape that carries its final figures (:meth:`OpsServer.scraped_after`).
                  With ``[ops] metrics_token``, only for ``Authorization: Bearer <it>``
                  (else 401, not counted as a scrape).
``GET /healthz``  200 ``ok`` while the process and its loop are alive (liveness).
``GET /readyz``   200 when ``ready()`` is true, else 503 with a JSON reason (readiness).
``GET /status``   the JSON object returned by ``status()``; peers are only counted, and the
                  session id and a client's name left out, unless the request carries
                  ``Authorization: Bearer <the status token>`` (``[ops] status_token_file``),
                  which also lists the name each hashed label value stands for
                  (``[ops] label_names``). With
                  ``[ops] metrics_token``, a request with neither token sees the role alone
                  (the figures are what that token keeps).

Access logging is off: a scrape every 15 s for weeks would drown the worker's own log.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from sl_pipeline.errors import ConfigError
from workers.ops.httpguard import IDLE_S, SCRAPE_COST, STALL_S, GuardedSite, Throttle
from workers.ops.metrics import WorkerMetrics
from workers.ops.redact import figures_hidden, redact
from workers.runtime.quietlog import INTERVAL_S

log = logging.getLogger(__name__)

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")
_SHUTDOWN_TIMEOUT_S = 5.0
# No route of the ops port takes a body. One that comes is refused before its turn, unread:
# past aiohttp's read buffer its sender's close queues behind it, unseen, so a request sent
# with a large body and left still took its turn, rendered for nobody (the red team's)
NO_BODY = "the ops port takes no request body\n"


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` or ``"[IPV6]:PORT"`` into ``(host, port)``.

    Port 0 is accepted (the OS picks a free port). Raises :class:`ConfigError` with a
    message naming the value and an example of the expected form.
    """
    example = 'expected "HOST:PORT", e.g. "0.0.0.0:9100", "127.0.0.1:9100" or "[::1]:9100"'
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"invalid listen address {value!r}", hint=example)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"invalid listen address {value!r}: {host!r} is not an IPv6 address",
                hint=example,
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"invalid listen address {value!r}: no port", hint=example)
        if ":" in host:
            raise ConfigError(
                f"invalid listen address {value!r}: put an IPv6 address in brackets",
                hint=example,
            )
        if not host:
            raise ConfigError(
                f"invalid listen address {value!r}: empty host "
                '(use "0.0.0.0" for every interface or "127.0.0.1" for this machine only)',
                hint=example,
            )
        if not _HOSTNAME_RE.match(host):
            raise ConfigError(f"invalid listen address {value!r}: bad host {host!r}", hint=example)
    return host, _parse_port(value, port_text, example)


def _parse_port(value: str, port_text: str, example: str) -> int:
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(
            f"invalid listen address {value!r}: port {port_text!r} is not a number",
            hint=example,
        )
    port = int(port_text)
    if port > 65535:
        raise ConfigError(
            f"invalid listen address {value!r}: port {port} is not in 0..65535", hint=example
        )
    return port


class QuietRequestErrors(logging.Filter):
    """aiohttp logs every request it cannot parse (a header over 8 KiB, too many headers)
    with its traceback: anyone reaching the port could write a trace per request. One line
    per kind of error and interval passes, without the trace, saying how many were held."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}  # error type -> last line, held back

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not record.exc_info:
            return True  # aiohttp's debug lines, when asked for, stay as they are
        exc = record.exc_info[1] if record.exc_info else None
        kind = type(exc).__name__ if exc is not None else "error"
        now = time.monotonic()
        last, held = self._seen.get(kind, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._seen[kind] = (last, held + 1)
            return False
        self._seen[kind] = (now, 0)  # bounded: a key per exception type aiohttp raises
        first = str(exc).strip().splitlines()[0][:200] if exc is not None and str(exc) else ""
        record.msg = f"{record.getMessage()}: {kind}: {first}"
        if held:
            record.msg += f" (and {held} more in the last {now - last:.0f}s)"  # type: ignore[operator]
        record.args, record.exc_info, record.exc_text = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


REQUEST_ERRORS = logging.getLogger("sl_pipeline.ops.requests")
REQUEST_ERRORS.addFilter(QuietRequestErrors())


async def _plain_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: sl-pipeline`` on every answer: aiohttp's default names the Python and
    aiohttp versions to whoever reaches the port (a stranger's list of known flaws)."""
    response.headers["Server"] = "sl-pipeline"


def _json_response(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, default=str, sort_keys=True),
        content_type="application/json",
    )


def _unauthorized() -> web.Response:
    return web.Response(
        status=401,
        text="/metrics needs Authorization: Bearer <the token in [ops] metrics_token's file>\n",
        headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
    )


class OpsServer:
    """HTTP server for ``/metrics``, ``/healthz``, ``/readyz`` and ``/status``.

    ``status`` and ``ready`` are called on every request, in the event loop: they must be
    quick and must not block. After :meth:`start`, ``self.port`` is the bound port (useful
    when ``port`` was 0).
    """

    def __init__(
        self,
        metrics: WorkerMetrics,
        status: Callable[[], Mapping[str, Any]],
        ready: Callable[[], bool],
        host: str,
        port: int,
        routes: Callable[[web.Application], None] | None = None,
        status_token: str = "",
        metrics_token: str = "",
    ) -> None:
        self.metrics = metrics
        self.metrics_token = metrics_token
        self._routes = routes  # more routes (the server's run API)
        self.throttle = Throttle()
        self.status_token = status_token
        self.host = host
        self.port = port
        self._status = status
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.scrapes = 0  # /metrics requests begun (numbered as their figures are read)
        self.sent = 0  # the highest number among the scrapes whose answer went out
        self._scraped: asyncio.Event | None = None  # set (and replaced) on each answer

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._throttled])
        app.on_response_prepare.append(_plain_server_header)
        exposition = make_aiohttp_handler(self.metrics.registry)

        async def metrics(request: web.Request) -> web.StreamResponse:
            if self.metrics_token and not bearer_matches(request, self.metrics_token):
                return _unauthorized()
            self.scrapes += 1
            number = self.scrapes  # before the figures are read (no await in between)
            response = await exposition(request)
            await response.prepare(request)  # counts once sent: the figures went out
            await response.write_eof()
            self.sent = max(self.sent, number)
            if self._scraped is not None:
                self._scraped.set()
                self._scraped = asyncio.Event()
            return response

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._handle_status)
        if self._routes is not None:
            self._routes(app)
        return app

    @web.middleware
    async def _throttled(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Each request waits its turn (``httpguard``): the loop also runs training. A scrape
        costs :data:`SCRAPE_COST` turns, one refused for its token one turn, as it costs the
        loop no more (at a scrape's cost, 40 connections asking without the token held
        Prometheus's scrape 8 s, near its 10 s timeout). A request whose client left while
        it waited gives its turn back, unanswered."""
        scrape = request.path == "/metrics" and (
            not self.metrics_token or bearer_matches(request, self.metrics_token)
        )
        if request.body_exists:  # none is read, nor waits its turn (see NO_BODY)
            return web.Response(status=413, text=NO_BODY, headers={"Connection": "close"})
        gone = lambda: request.transport is None or request.transport.is_closing()  # noqa: E731
        if not await self.throttle.turn(SCRAPE_COST if scrape else 1.0, gone):
            return web.Response(status=499, text="the client left\n")  # never sent: it left
        return await handler(request)  # type: ignore[no-any-return]

    async def start(self) -> None:
        """Bind and serve in the running loop. Raises ``OSError`` if the port is taken."""
        if self._runner is not None:
            raise RuntimeError("OpsServer already started")
        runner = web.AppRunner(
            self._make_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
            logger=REQUEST_ERRORS,
            keepalive_timeout=IDLE_S,
            lingering_time=0.0,  # a body nobody asked for is not read: the connection ends
        )
        await runner.setup()
        try:
            site = GuardedSite(
                runner, self.host, self.port, self.metrics.record_bound, stall_s=STALL_S
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("ops endpoint listening", extra={"host": self.host, "port": self.port})

    async def scraped_after(self, count: int, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until a scrape that began after ``self.scrapes`` was
        ``count`` has been answered: it carries every value set before ``count`` was read."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.sent <= count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or self._runner is None:
                return False
            if self._scraped is None:
                self._scraped = asyncio.Event()
            try:
                await asyncio.wait_for(self._scraped.wait(), left)
            except TimeoutError:
                return False
        return True

    async def linger(self, wait_s: float, stop: asyncio.Event) -> bool | None:
        """Serve until one scrape after now has been answered (True), at most ``wait_s``
        (False), or until ``stop`` is set (None)."""
        scraped = asyncio.create_task(self.scraped_after(self.scrapes, wait_s))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((scraped, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not scraped.done():
            scraped.cancel()
            return None
        return scraped.result()

    async def stop(self) -> None:
        """Stop serving and close the listening socket. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:9100``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready = bool(self._ready())
        except Exception as exc:
            log.exception("readiness check failed")
            return _json_response({"ready": False, "reason": f"readiness check failed: {exc}"}, 503)
        if ready:
            return _json_response({"ready": True})
        return _json_response({"ready": False, "reason": "worker is not ready yet"}, 503)

    async def _handle_status(self, request: web.Request) -> web.Response:
        try:
            body = dict(self._status())
        except Exception:  # the error's text (paths, names) is the log's, not the caller's
            log.exception("status callback failed")
            return _json_response({"error": "status unavailable; the worker's log says why"}, 500)
        if not self._authorized(request):
            if self.metrics_token and not bearer_matches(request, self.metrics_token):
                return _json_response(figures_hidden(body))
            return _json_response(redact(body))
        legend = self.metrics.name_legend()
        return _json_response({**body, "labels": legend} if legend else body)

    def _authorized(self, request: web.Request) -> bool:
        """Whether the request may see who the peers are: only with the configured token."""
        return bool(self.status_token) and bearer_matches(request, self.status_token)


def bearer_matches(request: web.Request, token: str) -> bool:
    """Whether the request's ``Authorization`` is ``Bearer <token>``, the token compared in
    constant time; the scheme's case and the spaces after it are the client's (RFC 7235,
    RFC 6750: ``bearer <token>`` from a hand-written ``curl -H`` was refused). aiohttp keeps
    a header's bytes that are no UTF-8 as surrogates, which ``encode()`` refuses (a 500 with
    a traceback per request): they are compared as the bytes sent."""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    scheme, _, credentials = given.partition(b" ")
    return (
        bool(token)
        and scheme.lower() == b"bearer"
        and hmac.compare_digest(credentials.lstrip(b" "), token.encode())
    )


def local_url(listen: str) -> str:
    """Base URL that reaches an ops server listening on ``listen`` from the same machine.

    A wildcard host (``0.0.0.0``, ``::``) becomes the matching loopback address, so
    ``sl-pipeline health --config ...`` can derive its URL from ``[ops] listen``.
    """
    host, port = parse_listen(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _readyz_url(url: str) -> str:
    """``url`` itself if it names a path, else ``url`` + ``/readyz``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/readyz")
    return urlunsplit(parts)


async def check_health(url: str, timeout_s: float) -> bool:
    """True when ``GET /readyz`` at ``url`` answers 200 within ``timeout_s`` seconds.

    ``url`` may be a base (``http://host:9100``, ``host:9100``) or a full URL with a path.
    Every failure (refused, timeout, non-200) is False; the reason is logged at DEBUG.
    """
    target = _readyz_url(url)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(target, allow_redirects=False) as response,
        ):
            if response.status == 200:
                return True
            log.debug("health check failed", extra={"url": target, "status": response.status})
            return False
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.debug("health check failed", extra={"url": target, "error": repr(exc)})
        return False


__all__ = ["OpsServer", "bearer_matches", "check_health", "local_url", "parse_listen", "redact"]
