"""Start-up and connection failures as one message naming the cause and what to do.

A client that cannot join says why: nothing listens at the address, something listens that
is not an sl-pipeline server, the server is not the one whose key it pins, or the server
does not admit its key. Each becomes a :class:`ConfigError` (exit status 2), since each is
fixed in a config file, not by waiting.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.error
import urllib.request
from typing import Any

from sl_pipeline.config import ClientConfig
from sl_pipeline.errors import ConfigError, PeerError, SLError, TransportError

PROBE_TIMEOUT_S = 1.0
_ENDPOINT = re.compile(r"^tcp://\[?([^\]]+?)\]?:(\d+)$")


def probe(endpoint: str) -> str:
    """What a plain TCP connect to ``endpoint`` finds, in words (for error messages)."""
    match = _ENDPOINT.match(endpoint)
    if match is None:
        return "the address cannot be probed"
    host, port = match.group(1), int(match.group(2))
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return (
                "a process listens there but answered no sl-pipeline handshake: is it the "
                "server's ops (HTTP) port or another program? use the port of the server's "
                "[server] bind"
            )
    except ConnectionRefusedError:
        return (
            "nothing listens there (connection refused): start the server first (or the "
            "relay, where this names a relay's port), or fix the port (the server's "
            "[server] bind, or a relay's [relay] bind)"
        )
    except TimeoutError:
        return "the host does not answer (wrong host, or a firewall drops the packets)"
    except OSError as exc:
        return f"the address is unreachable ({exc.strerror or exc})"


def no_server(cfg: ClientConfig) -> ConfigError:
    c = cfg.client
    return ConfigError(
        f"client.server = {c.server!r}: no sl-pipeline server (or relay) answered for "
        f"{c.retry_for_s:g}s; {probe(c.server)}"
    )


def lost_server(cfg: ClientConfig) -> TransportError:
    """The server this client trained with stopped answering (no probe: it was there)."""
    c = cfg.client
    return TransportError(
        f"the server at {c.server} stopped answering: no handshake for {c.retry_for_s:g}s "
        "after this client's steps there (stopped, frozen or cut off); once it answers "
        "again, run the same command: it resumes from the state it saved"
    )


def refused(exc: PeerError, cfg: ClientConfig) -> SLError:
    """A refused handshake that no retry will fix, explained; other errors unchanged."""
    c = cfg.client
    if exc.remote_code == "crypto" and "failed authentication" in str(exc):
        return ConfigError(
            f"the server at {c.server} could not open this client's hello: "
            f"client.server_key = {c.server_key!r} is not that server's public key; "
            "copy the server's .pub file (its kit's keys/server.pub) again"
        )
    if exc.remote_code == "not_admitted":
        # The connection gate's token depends on both keys, so the server cannot tell a
        # client it does not admit from one that pinned another server's key: name both.
        return ConfigError(
            f"the server at {c.server} does not admit this client's key "
            f"(client.key = {c.key!r}): add {c.name}.pub to the server's [server] admitted "
            f"folder and restart it; or client.server_key = {c.server_key!r} is not that "
            "server's public key: copy the server's .pub file (its kit's keys/server.pub) again"
        )
    return exc


def health_report(url: str, timeout_s: float) -> tuple[bool, str]:
    """(ready, what was found) for ``GET url/readyz``: the reason, when not ready, in words.
    Ready only on the worker's own answer, 200 and ``{"ready": true}``: another service
    on that port (a page for every path) is not a ready worker."""
    target = f"{url.rstrip('/')}/readyz"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:
            body = _readiness(response.read())
            if body is None:
                return False, _not_a_worker(url, f"HTTP {response.status}, no readiness")
            return response.status == 200 and body["ready"], f"{target} answered {response.status}"
    except urllib.error.HTTPError as err:
        body = _readiness(err.read())
        if body is None:
            return False, _not_a_worker(url, f"HTTP {err.code}")
        return False, f"the worker answers but is not ready ({err.code}: {body.get('reason')})"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            return False, (
                f"no worker answers at {url} (connection refused): it is stopped, or its "
                "[ops] listen is not this config's"
            )
        return False, (
            f"no answer from {url} within {timeout_s:g}s ({reason}): the worker is stuck or "
            "overloaded, or its [ops] listen is not this config's"
        )
    except http.client.HTTPException as exc:  # something else listens there
        return False, _not_a_worker(url, type(exc).__name__)


def _readiness(raw: bytes) -> dict[str, Any] | None:
    """A worker's /readyz body, ``{"ready": BOOL, ...}``; None for anything else."""
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("ready"), bool) else None


def _not_a_worker(url: str, what: str) -> str:
    return (
        f"something answers at {url} ({what}), but not as an sl-pipeline worker's ops port: "
        "its [ops] listen is not this config's"
    )


__all__ = ["health_report", "lost_server", "no_server", "probe", "refused"]
