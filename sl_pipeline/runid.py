"""Run ids: what a server's welcome and a relay's answers name (``run``), what ``[client] run``
asks for, and a folder name on the server's disk. Part of the protocol, so one definition for
the server that gives them and the clients and relays that check them."""

from __future__ import annotations

import re

from sl_pipeline.errors import ConfigError

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SERVER_RUN_ID = re.compile(r"run-(\d+)")  # the ids the server gives; no client may start one
# Names the runs folder uses itself: a run (or a group) of that name would be its index file.
RESERVED = frozenset({"runs.json"})


def is_run_id(value: str) -> bool:
    """A run id or a group name: a folder name of its own under the runs folder."""
    return RUN_ID.fullmatch(value) is not None and value.lower() not in RESERVED


def check_run_id(value: str, where: str) -> str:
    """A run id is also a folder name: letters, digits, '_', '.', '-' only."""
    if value.lower() in RESERVED:
        raise ConfigError(
            f"{where} = {value!r} is the name of the runs folder's index; choose another run id"
        )
    if not RUN_ID.fullmatch(value):
        raise ConfigError(
            f"{where} = {value!r} is not a valid run id; use 1-64 letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )
    return value


__all__ = ["RESERVED", "RUN_ID", "SERVER_RUN_ID", "check_run_id", "is_run_id"]
