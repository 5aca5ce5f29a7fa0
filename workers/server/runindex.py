"""``runs.json``, the runs list a server keeps across restarts, read back with every value
checked: the file is the operator's to move, restore or edit, and a value of a wrong type
must stop the start with one line naming the run, not end a long-lived server later (an
``ended`` that is text would fail the first time retention sorts the runs by it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sl_pipeline.errors import ConfigError
from sl_pipeline.tenancy import ONE_GROUP, SEPARATOR

ACTIVE, FINISHED, STOPPED = STATES = ("active", "finished", "stopped")  # a run's states
FRESH = "move it away to start a fresh list of runs"


def read_index(path: Path) -> list[dict[str, Any]]:
    """The entries of ``path`` (none if it does not exist); ConfigError if it is no list."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); {FRESH}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{path} holds {type(entries).__name__}, not a list of runs; {FRESH}")
    return [e for e in entries if isinstance(e, dict) and "id" in e]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def run_fields(info: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """A run's id and the rest of :class:`~workers.server.runs.Run`'s fields from a record
    of ``runs.json`` or a checkpoint (``source`` names it in the error)."""
    try:
        group = str(info.get("group") or ONE_GROUP)
        fields = dict(
            state=str(info.get("state", FINISHED)),
            members=set(map(str, info.get("members", info.get("clients", [])))),
            done=set(map(str, info.get("done", info.get("finished_clients", [])))),
            steps=int(info.get("steps", 0)),
            started=float(info.get("started") or time.time()),
            ended=_optional_float(info.get("ended")),
            last_loss=_optional_float(info.get("last_loss")),
            accuracies={str(k): float(v) for k, v in (info.get("accuracies") or {}).items()},
            model=str(info.get("model", "")),
            owner=str(info.get("owner", "")),
            client_steps={str(k): int(v) for k, v in (info.get("client_steps") or {}).items()},
            epochs={str(k): int(v) for k, v in (info.get("epochs") or {}).items()},
            group=group,
        )
        if fields["state"] not in STATES:
            raise ValueError(f"state {fields['state']!r} is none of {', '.join(STATES)}")
    except (TypeError, ValueError, AttributeError) as exc:  # a value of a wrong type
        raise ConfigError(
            f"run {info.get('id')!r} in {source} cannot be read ({exc}); correct it, or {FRESH}"
        ) from None
    return str(info["id"]).removeprefix(f"{group}{SEPARATOR}" if group else ""), fields


__all__ = ["ACTIVE", "FINISHED", "STATES", "STOPPED", "read_index", "run_fields"]
