"""The CLI's side of a server's run API (``sl-pipeline runs``): HTTP calls with the admin
token, and the table it prints. Apart from the API's server side (``workers.server.runs_api``)
so that the verb starts without importing torch (2-3 s of CPU a call)."""

from __future__ import annotations

import http.client
import json
import logging
import re
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sl_pipeline.config import read_toml, resolve_path
from sl_pipeline.errors import ConfigError
from workers.ops.http import local_url

log = logging.getLogger("sl_pipeline")
TOKEN_MIN_CHARS = 16
PLACEHOLDER = "REPLACE-WITH"  # how the shipped examples' secrets begin
_INLINE = re.compile(rf"[A-Za-z0-9_\-]{{{TOKEN_MIN_CHARS},}}")  # no dot, no slash: no file name


def read_token(
    base: Path, value: str, dotted: str = "ops.admin_token", *, warn: bool = True
) -> str:
    """The token in the file ``value`` names. A value that names no file and looks like a
    token is not echoed (the error goes to logs others may read); a worker's file that
    others may read is warned about (``warn``), as a private key is."""
    if _INLINE.fullmatch(value) and not (base / Path(value).expanduser()).exists():
        raise ConfigError(
            f"{dotted} names no file, and looks like a token itself: it names the file that "
            "holds the token (e.g. keys/metrics.token, mode 0600); put the token there"
        )
    path = resolve_path(base, value, dotted)
    try:
        token = path.read_text().strip()
    except UnicodeDecodeError:  # a key file, or some other binary file, named by mistake
        raise ConfigError(
            f"{dotted} = {value!r} is not a text file; name the token file that init or "
            "provision wrote (keys/admin.token, keys/metrics.token)"
        ) from None
    if len(token) < TOKEN_MIN_CHARS:
        raise ConfigError(
            f"{dotted} = {value!r}: the token is shorter than {TOKEN_MIN_CHARS} characters; "
            "write a long random one (sl-pipeline init and provision do)"
        )
    if token.startswith(PLACEHOLDER):  # deploy/k8s/secret.yaml's, public in this repository
        raise ConfigError(
            f"{dotted} = {value!r} holds the example's placeholder ({token}), which anyone "
            "can read in this project's repository; write a long random token there "
            "(head -c 32 /dev/urandom | base64)"
        )
    if warn and path.stat().st_mode & stat.S_IROTH:
        log.warning(
            "%s: %s is readable by every user of this machine (mode %o); run: chmod 600 %s",
            dotted,
            path,
            stat.S_IMODE(path.stat().st_mode),
            path,
        )
    return token


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
        self.token = read_token(config.parent, str(ops["admin_token"]), warn=False)
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

    def runs(self) -> dict[str, Any]:
        """``GET /runs``: ``{"runs": [RUN, ...]}``, or a one-line refusal for another API."""
        body = self.json("GET", "/runs")
        runs = body.get("runs") if isinstance(body, dict) else None
        if not isinstance(runs, list) or not all(map(_is_run, runs)):
            raise self._not_ours("JSON that lists no runs")
        return dict(body)

    def run(self, method: str, path: str) -> dict[str, Any]:
        """One run's record (``status``, ``stop``)."""
        info = self.json(method, path)
        if not _is_run(info):
            raise self._not_ours("JSON that describes no run")
        return dict(info)

    def model(self, run: str) -> bytes:
        """A run's saved server segment: ``torch.save``'s zip archive, nothing else."""
        data = self.call("GET", f"/runs/{run}/model")
        if not data.startswith(b"PK\x03\x04"):
            raise self._not_ours("a reply that is no saved model")
        return data

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


RUN_FIELDS = ("id", "state", "steps", "clients", "duration_s", "model")


def _is_run(record: Any) -> bool:
    """A run's record as the run API sends it (what :func:`format_runs` shows)."""
    return (
        isinstance(record, dict)
        and all(key in record for key in RUN_FIELDS)
        and isinstance(record["clients"], list)
    )


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


__all__ = ["RunClient", "format_runs", "read_token"]
