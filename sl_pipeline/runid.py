"""Run ids: what a server's welcome and a relay's answers name (``run``), what ``[client] run``
asks for, and a folder name on the server's disk. Part of the protocol, so one definition for
the server that gives them and the clients and relays that check them."""

from __future__ import annotations

import re

from sl_pipeline.errors import ConfigError

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SERVER_RUN_ID = re.compile(r"run-(\d+)")  # the ids the server gives; no client may start one


def check_run_id(value: str, where: str) -> str:
    """A run id is also a folder name: letters, digits, '_', '.', '-' only."""
    if not RUN_ID.fullmatch(value):
        raise ConfigError(
            f"{where} = {value!r} is not a valid run id; use 1-64 letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )
    return value


__all__ = ["RUN_ID", "SERVER_RUN_ID", "check_run_id"]
