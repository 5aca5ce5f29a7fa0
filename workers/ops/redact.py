"""``/status`` as anyone who reaches the ops port sees it: peers counted, not named; and,
where ``/metrics`` asks for a token, no training figure either (:func:`figures_hidden`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

NAMED_RUN_FIELDS = ("clients", "finished_clients", "accuracies")  # keyed by client name
_SERVER_RUN_ID = re.compile(r"run-[0-9]+")  # the ids a server numbers itself (runs.py)


def redact(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/status`` for anyone who can reach the port: how many peers, not who (names and
    key fingerprints), no session id, and each run's clients as counts."""
    out = {k: v for k, v in body.items() if k not in ("peers", "session", "name")}
    if "peers" in body:
        out["peers"] = _count(body["peers"])
    if isinstance(body.get("runs"), list | tuple):
        out["runs"] = [_redact_run(run, i) for i, run in enumerate(body["runs"], start=1)]
    current = body.get("current_run")
    if isinstance(current, str) and not _SERVER_RUN_ID.fullmatch(current):
        ids = [run.get("id") for run in body.get("runs") or [] if isinstance(run, Mapping)]
        out["current_run"] = f"#{ids.index(current) + 1}" if current in ids else "#"
    if {"peers", "session", "runs", "name"} & set(body):
        out["redacted"] = (
            "peer and client names, key fingerprints and the session id need the status token "
            "([ops] status_token_file)"
        )
    return out


def figures_hidden(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/status`` of a worker whose ``/metrics`` asks for a token, for a request without
    it: its role alone. Its loss, accuracy, privacy budget, steps and runs are the figures
    the token keeps (before, a client's /status showed them to whoever reached the port)."""
    return {
        "role": body.get("role"),
        "redacted": "training figures need [ops] metrics_token's token; names, key "
        "fingerprints and the session id need the status token ([ops] status_token_file)",
    }


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, list | tuple | dict) else value


def _redact_run(run: Any, index: int) -> Any:
    """A run's entry with its clients counted, not named (per-client accuracies included),
    without its group, and its model as "saved" (its path names the group and the run). A
    run id a client chose (``hospital-a-trial``), or a group's (``hospital:run-1``), may say
    who it is, so it shows as its place in the list; the server's own ``run-N`` ids
    (of a server without groups) say nothing and stay."""
    if not isinstance(run, Mapping):
        return run
    out = {k: _count(v) if k in NAMED_RUN_FIELDS else v for k, v in run.items() if k != "group"}
    if "id" in out and not _SERVER_RUN_ID.fullmatch(str(out["id"])):
        out["id"] = f"#{index}"
    if out.get("model"):  # its path holds the group's folder and the run's id
        out["model"] = "saved"
    return out


__all__ = ["figures_hidden", "redact"]
